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
from rf_runtime.bundle import StreamSection
from rf_runtime.errors import RFError
from rf_runtime.files import atomic_write
from rf_runtime.schema import parse, require_finite

FORMAT = "rf_runtime.stream_snapshot"
FORMAT_VERSION = 1
_ARRAYS = ("cache_k", "cache_v", "text_k", "text_v", "latents")


class SnapshotError(RFError):
    """A stream snapshot cannot be read, or does not fit the model it is resumed on."""


# ---- the header's schema (rf_runtime.schema.parse names the bad key) ------------------------------


@dataclass(frozen=True)
class _PCG64Words:
    state: int
    inc: int


@dataclass(frozen=True)
class _RNGState:  # numpy's PCG64 ``bit_generator.state``
    bit_generator: str
    state: _PCG64Words
    has_uint32: int
    uinteger: int


@dataclass(frozen=True)
class _Geometry:  # Backend.geometry()
    latent_channels: int
    latent_hw: tuple[int, int]
    vae_stride: tuple[int, int, int]
    fps: int
    stream: StreamSection
    kv: tuple[int, ...]
    text_kv: tuple[int, ...]
    latents: tuple[int, ...]
    vae_cache: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Header:
    format: str
    version: int
    prompt: str
    prompt_history: tuple[tuple[int, str], ...]
    seed: int
    rng_state: _RNGState
    chunk_index: int
    frames_emitted: int
    num_frames: int | None
    geometry: _Geometry
    chunks_committed: int
    vae_cache_slots: int


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
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "prompt": self.prompt,
            "prompt_history": [list(p) for p in self.prompt_history],
            "seed": self.seed,
            "rng_state": self.rng_state,
            "chunk_index": self.chunk_index,
            "frames_emitted": self.frames_emitted,
            "num_frames": self.num_frames,
            "geometry": self.geometry,
            "chunks_committed": self.state.chunks_committed,
            "vae_cache_slots": len(self.state.vae_cache),
        }

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
        if os.path.isdir(path):
            raise SnapshotError(
                f"stream snapshot {path} is a directory: pass the .npz file written by StreamSnapshot.save"
            )
        if not os.path.isfile(path):
            raise SnapshotError(
                f"stream snapshot {path} does not exist: pass a file written by StreamSnapshot.save"
            )
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
            raise SnapshotError(
                f"{path} is not a stream snapshot (format {header.get('format')!r}): {hint}"
                if isinstance(header, dict)
                else f"{path}: {hint}"
            )
        if header.get("version") != FORMAT_VERSION:
            raise SnapshotError(
                f"{path} is a version {header.get('version')!r} snapshot; this runtime reads version "
                f"{FORMAT_VERSION}: resume it with the rf_runtime that wrote it"
            )
        rng = header.get("rng_state")
        if isinstance(rng, dict) and rng.get("bit_generator") != "PCG64":
            raise SnapshotError(
                f"{path}: header key 'rng_state.bit_generator' is {rng.get('bit_generator')!r}; "
                f"streams draw their noise with PCG64: {hint}"
            )
        h = parse(_Header, header, where=path, error=SnapshotError, hint=hint, what="header key")
        for key in ("chunk_index", "frames_emitted", "chunks_committed", "vae_cache_slots", "seed"):
            if getattr(h, key) < 0:
                raise SnapshotError(
                    f"{path}: header key {key!r} is {getattr(h, key)}, it must be >= 0: {hint}"
                )
        names = [*_ARRAYS, *(f"vae_cache_{i}" for i in range(header["vae_cache_slots"]))]
        missing = [n for n in names if n not in files]
        if missing:
            raise SnapshotError(f"{path} lacks the arrays {missing}: {hint}")
        wrong = [n for n in names if files[n].dtype != np.float32]
        if wrong:
            raise SnapshotError(f"{path}: the arrays {wrong} are not float32: {hint}")
        require_finite(
            {n: files[n] for n in names},
            path,
            SnapshotError,
            "a stream state is finite; this file was damaged or made by a diverged stream: save it again "
            "from a healthy stream",
        )
        state = StateArrays(
            **{n: files[n] for n in _ARRAYS},
            vae_cache=tuple(files[f"vae_cache_{i}"] for i in range(header["vae_cache_slots"])),
            chunks_committed=header["chunks_committed"],
        )
        snap = cls(
            prompt=header["prompt"],
            prompt_history=tuple((int(i), p) for i, p in header["prompt_history"]),
            seed=header["seed"],
            rng_state=header["rng_state"],
            chunk_index=header["chunk_index"],
            frames_emitted=header["frames_emitted"],
            num_frames=header["num_frames"],
            geometry=header["geometry"],
            state=state,
        )
        snap.check_shapes(path)
        return snap

    def check_shapes(self, where: str = "the snapshot") -> None:
        """The arrays have the shapes its geometry says (a consistency check of the file)."""
        g, s = self.geometry, self.state
        want = {
            "cache_k": g["kv"],
            "cache_v": g["kv"],
            "text_k": g["text_kv"],
            "text_v": g["text_kv"],
            "latents": g["latents"],
        }
        bad = [
            f"{n} {list(getattr(s, n).shape)} != {list(w)}"
            for n, w in want.items()
            if list(getattr(s, n).shape) != list(w)
        ]
        if s.vae_cache and [list(a.shape) for a in s.vae_cache] != [list(w) for w in g["vae_cache"]]:
            bad.append("vae_cache shapes differ from the geometry")
        if bad:
            raise SnapshotError(
                f"{where}: arrays do not match the snapshot's own geometry ({'; '.join(bad)}); "
                "it was altered: save the stream again"
            )


def geometry_difference(have: dict, want: dict) -> list[str]:
    """Human-readable differences between two ``Backend.geometry()`` dicts (JSON-normalised)."""
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))
    out = []
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            out.append(f"{key}: snapshot {have.get(key)} != model {want.get(key)}")
    return out
