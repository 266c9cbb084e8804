"""``StreamSnapshot``: everything a stream needs to go on exactly where it stopped.

    snap = stream.save_state()          # host copies of the device state, the RNG state, counters
    snap.save("fox.rfstate.npz")        # atomic: written to a temporary name, then renamed
    stream = streamer.resume(StreamSnapshot.load("fox.rfstate.npz"))

The frames after ``resume`` equal those of the uninterrupted stream bit for bit (same backend):
the KV cache, the text K/V, the VAE feature cache and the kept window latents are stored as
float32 arrays (exact for fp32, bf16 and fp16 buffers), and the numpy PCG64 state as its integers.
The file is a plain ``.npz`` (no pickle) with a JSON header; numpy only, no torch.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from rf_runtime.backends.base import StateArrays
from rf_runtime.errors import RFError
from rf_runtime.files import atomic_write

FORMAT = "rf_runtime.stream_snapshot"
FORMAT_VERSION = 1
_ARRAYS = ("cache_k", "cache_v", "text_k", "text_v", "latents")


class SnapshotError(RFError):
    """A stream snapshot cannot be read, or does not fit the model it is resumed on."""


@dataclass(frozen=True)
class StreamSnapshot:
    """The state of one stream between two chunks.

    prompt: the prompt in use; prompt_history: ((first chunk, prompt), ...) of every switch.
    seed, rng_state: the noise seed and numpy's PCG64 ``bit_generator.state`` after the last chunk.
    chunk_index: chunks made so far; frames_emitted: video frames handed out so far;
    num_frames: the stream's frame limit (None: unbounded).
    geometry: ``Backend.geometry()`` of the model that made it; resume checks it.
    state: the device state (KV cache, text K/V, VAE feature cache, window latents).
    """

    prompt: str
    prompt_history: tuple[tuple[int, str], ...]
    seed: int
    rng_state: dict
    chunk_index: int
    frames_emitted: int
    num_frames: int | None
    geometry: dict
    state: StateArrays

    def header(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "prompt": self.prompt,
                "prompt_history": [list(p) for p in self.prompt_history], "seed": self.seed,
                "rng_state": self.rng_state, "chunk_index": self.chunk_index, "frames_emitted": self.frames_emitted,
                "num_frames": self.num_frames, "geometry": self.geometry,
                "chunks_committed": self.state.chunks_committed, "vae_cache_slots": len(self.state.vae_cache)}

    def save(self, path: str | os.PathLike) -> str:
        """Write the snapshot to ``path`` (.npz) atomically: a temporary file beside it, then a rename."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SnapshotError(f"cannot save the snapshot to {path}: the folder {folder} does not exist")
        arrays = {name: getattr(self.state, name) for name in _ARRAYS}
        arrays.update({f"vae_cache_{i}": a for i, a in enumerate(self.state.vae_cache)})
        arrays["header"] = np.array(json.dumps(self.header()))
        return atomic_write(path, lambda f: np.savez(f, **arrays), what="the snapshot")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StreamSnapshot":
        """Read a snapshot written by ``save``; a missing, truncated or foreign file raises SnapshotError."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SnapshotError(f"stream snapshot {path} does not exist: pass a file written by StreamSnapshot.save")
        hint = "it is not a stream snapshot, or it was truncated or altered; save the stream again"
        try:
            with np.load(path, allow_pickle=False) as data:
                files = {name: data[name] for name in data.files}  # reading checks every entry's CRC
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"could not read {path} ({exc}): {hint}") from exc
        try:
            header = json.loads(str(files["header"]))
        except (KeyError, ValueError) as exc:
            raise SnapshotError(f"{path} has no valid snapshot header: {hint}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SnapshotError(f"{path} is not a stream snapshot (format {header.get('format')!r}): {hint}"
                                if isinstance(header, dict) else f"{path}: {hint}")
        if header.get("version") != FORMAT_VERSION:
            raise SnapshotError(f"{path} is a version {header.get('version')!r} snapshot; this runtime reads version "
                                f"{FORMAT_VERSION}: resume it with the rf_runtime that wrote it")
        names = [*_ARRAYS, *(f"vae_cache_{i}" for i in range(header["vae_cache_slots"]))]
        missing = [n for n in names if n not in files]
        if missing:
            raise SnapshotError(f"{path} lacks the arrays {missing}: {hint}")
        state = StateArrays(**{n: files[n] for n in _ARRAYS},
                            vae_cache=tuple(files[f"vae_cache_{i}"] for i in range(header["vae_cache_slots"])),
                            chunks_committed=header["chunks_committed"])
        snap = cls(prompt=header["prompt"], prompt_history=tuple((int(i), p) for i, p in header["prompt_history"]),
                   seed=header["seed"], rng_state=header["rng_state"], chunk_index=header["chunk_index"],
                   frames_emitted=header["frames_emitted"], num_frames=header["num_frames"],
                   geometry=header["geometry"], state=state)
        snap.check_shapes(path)
        return snap

    def check_shapes(self, where: str = "the snapshot") -> None:
        """The arrays have the shapes its geometry says (a consistency check of the file)."""
        g, s = self.geometry, self.state
        want = {"cache_k": g["kv"], "cache_v": g["kv"], "text_k": g["text_kv"], "text_v": g["text_kv"],
                "latents": g["latents"]}
        bad = [f"{n} {list(getattr(s, n).shape)} != {list(w)}" for n, w in want.items()
               if list(getattr(s, n).shape) != list(w)]
        if s.vae_cache and [list(a.shape) for a in s.vae_cache] != [list(w) for w in g["vae_cache"]]:
            bad.append("vae_cache shapes differ from the geometry")
        if bad:
            raise SnapshotError(f"{where}: arrays do not match the snapshot's own geometry ({'; '.join(bad)}); "
                                "it was altered: save the stream again")


def geometry_difference(have: dict, want: dict) -> list[str]:
    """Human-readable differences between two ``Backend.geometry()`` dicts (JSON-normalised)."""
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))
    out = []
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            out.append(f"{key}: snapshot {have.get(key)} != model {want.get(key)}")
    return out
