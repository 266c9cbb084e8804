"""What the streamer needs from an execution backend (PyTorch, onnxruntime, TensorRT).

The streamer owns the chunk loop (noise, schedule, cache bookkeeping, frame counting); a backend
owns the device: it keeps the text keys/values, the KV cache and the VAE feature cache of a stream
as device buffers and runs the model on them. Device arrays are opaque to the streamer: it only
passes back what the backend gave it. Nothing but finished frames comes back to the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


@dataclass
class StreamState:
    """Per-stream state a backend allocates once: device buffers plus the chunk counter."""

    device: Any  # the backend's buffers (cache, text K/V, VAE feature cache)
    chunks_committed: int = 0
    extra: dict = field(default_factory=dict)


class Backend(ABC):
    """One execution backend. ``upload`` takes numpy float32 arrays; everything else stays on the device."""

    name: str = "backend"
    info: ModelInfo
    model_card = None  # a bundle's rf_runtime.bundle.ModelCard, checked by the streamer; None: no card

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


def to_uint8_frames(pixels: np.ndarray) -> np.ndarray:
    """VAE output [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]: clamp(x * 0.5 + 0.5, 0, 1), rounded."""
    x = np.clip(pixels * 0.5 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray((x * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 3, 0))
