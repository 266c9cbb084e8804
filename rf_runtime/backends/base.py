"""What the streamer needs from an execution backend (PyTorch, onnxruntime, TensorRT).

The streamer owns the chunk loop (noise, schedule, cache bookkeeping, frame counting); a backend
owns the device: it keeps the text keys/values, the KV cache and the VAE feature cache of a stream
as device buffers and runs the model on them. Device arrays are opaque to the streamer: it only
passes back what the backend gave it. Nothing but finished frames comes back to the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from rf_runtime.errors import ConfigError
from rf_runtime.sampler import StreamSettings


@dataclass(frozen=True)
class ModelInfo:
    """Geometry a backend serves: everything the streamer needs to size noise and count frames."""

    latent_channels: int  # C of the latents (16)
    latent_hw: tuple[int, int]  # latent H, W (60, 104 at 480x832)
    vae_stride: tuple[int, int, int]  # (temporal, spatial, spatial) = (4, 8, 8)
    settings: StreamSettings
    fps: int = 16

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.latent_hw[0] * self.vae_stride[1], self.latent_hw[1] * self.vae_stride[2]

    def frames_of_chunk(self, index: int) -> int:
        """Video frames decoded from chunk ``index``: 1 + 4(f-1) for the first, 4f after (9, 12)."""
        f, s = self.settings.chunk_frames, self.vae_stride[0]
        return 1 + s * (f - 1) if index == 0 else s * f

    @property
    def context_chunks(self) -> int:
        """Chunks whose keys/values the cache holds once full (sink + window without the current): 2."""
        return self.settings.cache_spec.context_frames // self.settings.chunk_frames

    @property
    def chunk_latent_shape(self) -> tuple[int, ...]:
        """[1, f, C, H, W]: the latents of one chunk."""
        return (1, self.settings.chunk_frames, self.latent_channels, *self.latent_hw)


@dataclass
class StreamState:
    """Per-stream state a backend allocates once (``new_stream``); opaque to the streamer."""

    device: Any  # the backend's buffers (cache, text K/V, VAE feature cache) and its chunk counter


@dataclass(frozen=True)
class StateArrays:
    """A stream's device state copied to the host (float32 numpy), for snapshots.

    cache_k, cache_v: [L, 1, M*T, N, D] the self-attention KV cache (sink + window, before RoPE).
    text_k, text_v: [L, 1, text_len, N, D] the cross-attention K/V of the current prompt.
    latents: [K, 1, f, C, H, W] clean latents of the last K chunks (ring, slot = chunk index % K),
        kept so that a prompt switch can re-cache them.
    vae_cache: the causal VAE decoder's feature cache slots, in call order; empty before the first decode.
    chunks_committed: chunks written into the KV cache since it was last (re)filled.
    """

    cache_k: np.ndarray
    cache_v: np.ndarray
    text_k: np.ndarray
    text_v: np.ndarray
    latents: np.ndarray
    vae_cache: tuple[np.ndarray, ...]
    chunks_committed: int


class Backend(ABC):
    """One execution backend. ``upload`` takes numpy float32 arrays; everything else stays on the device."""

    name: str = "backend"
    info: ModelInfo
    model_card = None  # a bundle's rf_runtime.bundle.ModelCard, checked by the streamer; None: no card
    # Decode beside the next chunk's denoising (``Stream``, docs/notes/speed.md "Overlap"):
    # supports_overlap: the capability. True only where ``decode(state, stored_latents(state, slot))`` may
    #   run in a second thread while the calling thread runs the same stream's ``cache_pass``,
    #   ``denoise_step``, ``all_finite`` and ``store_latents`` into another slot: the decode reads and
    #   writes nothing they touch, and the framework releases the GIL while it computes.
    # overlap: this loaded backend's choice (``choose_overlap``, made at load from the machine: it sets
    #   the threads of the sessions); the streamer overlaps exactly when it is True.
    supports_overlap: bool = False
    overlap: bool = False

    @abstractmethod
    def encode_prompt(self, prompt: str) -> Any:
        """Run the text encoder and the cross-attention K/V projection once for a prompt."""

    @abstractmethod
    def new_stream(self, text: Any) -> StreamState:
        """Allocate the buffers of one stream (KV cache, VAE cache) for an encoded prompt."""

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """Host float32 array -> device array."""

    @abstractmethod
    def denoise_step(self, state: StreamState, x: Any, step: int, eps: Any | None) -> tuple[Any, Any | None]:
        """Denoising step ``step`` on chunk latents x [1, f, C, H, W]: returns (x0, x_next), where
        x_next = re-noised x0 at the next step's sigma (None after the last step)."""

    @abstractmethod
    def cache_pass(self, state: StreamState, x0: Any) -> None:
        """Rerun the clean chunk at t = context_t and commit its K/V into the cache (evict + fold)."""

    @abstractmethod
    def decode(self, state: StreamState, x0: Any) -> np.ndarray:
        """Decode chunk latents through the streaming VAE -> uint8 frames [T, H, W, 3] on the host."""

    # ---- prompt switch, snapshots, timing (optional: a backend without them says so) ------------

    def set_text(self, state: StreamState, text: Any) -> None:
        """Make ``text`` (from ``encode_prompt``) the stream's cross-attention K/V."""
        raise self._unsupported("prompt switching")

    def store_latents(self, state: StreamState, slot: int, x0: Any) -> None:
        """Copy a chunk's clean latents into slot ``slot`` of the stream's ring of ``info.context_chunks``."""
        raise self._unsupported("prompt switching")

    def stored_latents(self, state: StreamState, slot: int) -> Any:
        """The device latents [1, f, C, H, W] kept in ring slot ``slot``."""
        raise self._unsupported("prompt switching")

    def set_cache_fill(self, state: StreamState, chunks_committed: int) -> None:
        """Declare only the first ``chunks_committed`` chunks of the KV cache valid (the rest is
        ignored by attention and overwritten by the next commits)."""
        raise self._unsupported("prompt switching")

    def export_state(self, state: StreamState) -> StateArrays:
        """Copy the stream's device state to the host, exactly."""
        raise self._unsupported("save_state")

    def import_state(self, arrays: StateArrays, latent_frames_decoded: int) -> StreamState:
        """A new stream whose device state is ``arrays`` (exact copies)."""
        raise self._unsupported("resume")

    def state_shapes(self) -> dict:
        """Shapes of the arrays of ``StateArrays`` for this model: {"kv", "text_kv", "latents", "vae_cache"}."""
        raise self._unsupported("save_state")

    def all_finite(self, x: Any) -> bool:
        """True when the device array ``x`` (chunk latents) holds no NaN and no infinity (the stream's
        numeric guard, once per chunk)."""
        return bool(np.isfinite(np.asarray(x)).all())

    def synchronize(self) -> None:
        """Wait until queued device work is done (for timing); nothing to do on synchronous backends."""

    # ---- several streams in one call (rf_runtime.batching) ----------------------------------------
    # The scheduler runs the chunks of several streams together through these: ``gather`` the rows'
    # state once per chunk, then every denoising step, the cache pass and the decode for all rows, then
    # ``release``. The defaults run the rows one after another through the one-stream methods (so
    # every backend can serve a batch); a backend with batched graphs runs each phase as one call.

    def batch_sizes(self) -> tuple[int, ...]:
        """The numbers of rows one call serves, ascending, always with 1; (1,): rows run one by one."""
        return (1,)

    def gather(self, states: list[StreamState]) -> Any:
        """Start a chunk of several streams at once (their cache state must not change until
        ``release``); returns the handle the ``*_rows`` methods take."""
        return list(states)

    def denoise_rows(self, rows: Any, xs: list, step: int, eps: list) -> tuple[list, list]:
        """``denoise_step`` for every row: returns (x0 per row, x_next per row or None after the last step)."""
        out = [self.denoise_step(s, x, step, e) for s, x, e in zip(rows, xs, eps)]
        return [o[0] for o in out], [o[1] for o in out]

    def store_rows(self, rows: Any, slots: list[int], x0s: list) -> None:
        """``store_latents`` for every row."""
        for s, slot, x0 in zip(rows, slots, x0s):
            self.store_latents(s, slot, x0)

    def cache_pass_rows(self, rows: Any, x0s: list) -> None:
        """``cache_pass`` for every row."""
        for s, x0 in zip(rows, x0s):
            self.cache_pass(s, x0)

    def decode_rows(self, rows: Any, x0s: list) -> list[np.ndarray]:
        """``decode`` for every row: uint8 frames per row."""
        return [self.decode(s, x0) for s, x0 in zip(rows, x0s)]

    def release(self, rows: Any) -> None:
        """End a chunk started by ``gather`` (its buffers go back to the backend)."""

    def describe(self) -> dict:
        """What runs: backend, device, precision (for benchmarks and logs)."""
        return {"backend": self.name, "overlap": self.overlap}

    def geometry(self) -> dict:
        """Everything a stream's state depends on; a snapshot resumes only where this is equal."""
        info = self.info
        settings = info.settings.to_dict()
        shapes = {
            k: [list(s) for s in v] if k == "vae_cache" else list(v) for k, v in self.state_shapes().items()
        }
        return {
            "latent_channels": info.latent_channels,
            "latent_hw": list(info.latent_hw),
            "vae_stride": list(info.vae_stride),
            "fps": info.fps,
            "stream": settings,
            **shapes,
        }

    def _unsupported(self, what: str) -> ConfigError:
        return ConfigError(
            f"the {self.name} backend does not support {what}: use the torch or onnxruntime backend"
        )


def choose_overlap(requested, *, supported: bool, threads_given: bool, cores: int, backend: str) -> bool:
    """Whether a stream decodes chunk n in a worker thread while chunk n+1 denoises (``Backend.overlap``).

    requested: None chooses: on where the backend supports it, at least 2 cores are usable and no
    threads were given (a caller that sets threads, e.g. 1 per session for several streams at once, is
    spreading streams over the cores itself); True or False forces it; True on a backend that does not
    support it is a ConfigError."""
    if requested not in (None, True, False):
        raise ConfigError(f"overlap must be None (chosen from the machine), True or False, got {requested!r}")
    if requested is True and not supported:
        raise ConfigError(
            f"overlap=True: the {backend} backend cannot decode a chunk in a second thread beside the next "
            "chunk's denoising (only an engine bundle on onnxruntime CPU can); pass overlap=None (chosen "
            "from the backend and the machine) or overlap=False"
        )
    if requested is None:
        return supported and not threads_given and cores >= 2
    return requested


def to_uint8_frames(
    pixels: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """VAE output [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]: clamp(x * 0.5 + 0.5, 0, 1), rounded.

    out (uint8 [T, H, W, 3]) and scratch (like ``pixels``): preallocated memory to compute in, so that a
    hot path allocates nothing (the engine backend); the same operations in the same order either way."""
    if scratch is None:
        scratch = np.empty(pixels.shape, pixels.dtype)
    if out is None:
        out = np.empty((*pixels.shape[1:], 3), np.uint8)
    np.multiply(pixels, 0.5, out=scratch)
    np.add(scratch, 0.5, out=scratch)
    np.maximum(scratch, 0.0, out=scratch)  # clip to [0, 1] (np.clip keeps a little memory per call)
    np.minimum(scratch, 1.0, out=scratch)
    np.multiply(scratch, 255.0, out=scratch)
    np.add(scratch, 0.5, out=scratch)
    np.copyto(out, scratch.transpose(1, 2, 3, 0), casting="unsafe")
    return out
