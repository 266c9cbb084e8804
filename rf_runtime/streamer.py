"""``Streamer``: iterate the frames of an unbounded text-to-video stream as they are made.

    streamer = Streamer.from_checkpoint("Wan2.1-T2V-1.3B", "rewardforcing.pt")
    for frames in streamer.stream("a red fox running through snow", seed=0):
        ...  # uint8 [T, H, W, 3]: 9 frames for the first chunk, 12 after, at 16 fps

Work happens as the caller iterates. The noise comes from numpy's PCG64 seeded by ``seed``, in a
fixed order (``sampler.chunk_noise``), so the same seed gives the same video on every backend.
The streamer never branches on the backend: it runs the chunk loop over the ``Backend`` interface.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rf_runtime.backend import Backend, ModelInfo
from rf_runtime.errors import InputError
from rf_runtime.sampler import StreamSettings, chunk_noise

logger = logging.getLogger("rf_runtime")


@dataclass(frozen=True)
class Chunk:
    """One generated chunk."""

    index: int  # 0, 1, 2, ...
    start_frame: int  # index of its first video frame in the stream
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seconds: float  # wall time to make it (denoise + cache pass + decode)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError("the prompt is empty: describe the video to generate, e.g. 'a red circle bouncing'")
    return prompt


class Streamer:
    """Streams video for a prompt through one backend.

    Build it with ``from_checkpoint`` (PyTorch reference models) or, for engine bundles,
    ``from_engine``; or pass any ``Backend``.
    """

    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def settings(self) -> StreamSettings:
        return self.backend.info.settings

    @property
    def fps(self) -> int:
        return self.backend.info.fps

    @classmethod
    def from_checkpoint(cls, model_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                        vae_path: str | os.PathLike | None = None, text_encoder=None,
                        settings: StreamSettings | None = None, height: int | None = None, width: int | None = None,
                        device: str = "cpu", dtype: str = "float32", use_ema: bool = True) -> "Streamer":
        """Load the PyTorch reference models from a Wan2.1-style directory.

        model_dir: holds ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (the DiT),
            ``Wan2.1_VAE.pth`` (or ``vae.safetensors``) and the text encoder (umT5 ``.pth`` +
            ``google/umt5-xxl/`` tokenizer); an optional ``rf_runtime.json`` carries the VAE config,
            stream settings and resolution of models trained with this project.
        checkpoint: a generator checkpoint to load on top (``rewardforcing.pt`` or a training
            checkpoint); ``use_ema`` picks ``generator_ema`` over ``generator`` in the latter.
        text_encoder: a ``TextEncoder`` object to use instead of the one in ``model_dir``.
        """
        from rf_runtime.torch_backend import TorchBackend

        backend = TorchBackend.from_dir(model_dir, checkpoint, vae_path=vae_path, text_encoder=text_encoder,
                                        settings=settings, height=height, width=width, device=device,
                                        dtype=dtype, use_ema=use_ema)
        return cls(backend)

    @classmethod
    def from_engine(cls, path: str | os.PathLike, backend: str = "auto", device: str = "cpu") -> "Streamer":
        """Stream from an engine bundle (``rf_runtime.bundle``); no torch needed.

        backend: "onnxruntime", "tensorrt", or "auto" (TensorRT when the bundle has plans for this
            GPU and tensorrt + cuda-python are installed, else onnxruntime). An explicit backend
            that cannot run here is an error, never a silent fallback.
        device: "cpu" or "cuda". The bundle's model card is checked against its stream settings.
        """
        from rf_runtime.engine_backend import EngineBackend

        return cls(EngineBackend.load(path, backend=backend, device=device))

    # ---- streaming ---------------------------------------------------------------------------

    def frames_to_chunks(self, num_frames: int) -> int:
        """Chunks needed for ``num_frames`` video frames (the last one is trimmed)."""
        first = self.info.frames_of_chunk(0)
        later = self.info.frames_of_chunk(1)
        if num_frames <= first:
            return 1
        return 1 + -(-(num_frames - first) // later)

    def stream_chunks(self, prompt: str, *, seed: int = 0, num_frames: int | None = None) -> Iterator[Chunk]:
        """Yield ``Chunk`` objects as they are generated; forever when ``num_frames`` is None."""
        check_prompt(prompt)
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise InputError(f"num_frames must be a positive integer or None (unbounded), got {num_frames!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if self.backend.model_card is not None:
            self.backend.model_card.check_length(num_frames)
        return self._stream(prompt, int(seed), num_frames)

    def stream(self, prompt: str, *, seed: int = 0, num_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield each chunk's decoded frames, uint8 [T, H, W, 3], as soon as the chunk is done.

        9 frames for the first chunk and 12 after (3 latent frames per chunk); with ``num_frames``
        the stream stops after exactly that many frames, without it it runs forever.
        """
        return (chunk.frames for chunk in self.stream_chunks(prompt, seed=seed, num_frames=num_frames))

    def _stream(self, prompt: str, seed: int, num_frames: int | None) -> Iterator[Chunk]:
        be, info = self.backend, self.backend.info
        settings = info.settings
        rng = np.random.Generator(np.random.PCG64(seed))
        state = be.new_stream(be.encode_prompt(prompt))
        shape = (1, info.latent_channels, *info.latent_hw)
        emitted = 0
        chunks = range(self.frames_to_chunks(num_frames)) if num_frames else itertools.count()
        for index in chunks:
            start = time.perf_counter()
            init, fresh = chunk_noise(rng, settings, shape)
            x = be.upload(init)
            for k in range(settings.num_steps):
                eps = be.upload(fresh[k]) if k + 1 < settings.num_steps else None
                x0, x = be.denoise_step(state, x, k, eps)
            # rerun with timestep zero to update the KV cache using clean context
            be.cache_pass(state, x0)
            frames = be.decode(state, x0)
            if num_frames is not None:
                frames = frames[: num_frames - emitted]
            chunk = Chunk(index, emitted, frames, time.perf_counter() - start)
            emitted += len(frames)
            logger.debug("chunk %d: %d frames in %.3f s", index, len(frames), chunk.seconds)
            yield chunk
