"""Few-step flow-matching sampling of a stream, chunk by chunk (SPEC section 2).

The schedule and the x0 / re-noise math are plain numpy and Python, shared by every backend.
``generate_latents`` is the PyTorch reference loop over a ``CausalDiT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rf_runtime.cache import CacheSpec, commit_chunk
from rf_runtime.errors import ConfigError, InputError


@dataclass(frozen=True)
class StreamSettings:
    """How a stream is sampled and cached.

    chunk_frames: latent frames per chunk (3 -> 12 video frames, 9 for the first chunk).
    sink_frames, window_frames, ema_alpha: the KV cache (see ``rf_runtime.cache.CacheSpec``).
    timesteps: the denoising steps on the 0..1000 scale, before warping.
    shift: flow-matching timestep shift (5).
    warp: map the steps through the shifted table (1000, 750, 500, 250 -> 1000, 937.5, 833.3, 625).
    context_t: timestep of the clean-context pass that writes a chunk's K/V into the cache (0).
    num_train_timesteps: length of the scheduler table (1000).
    """

    chunk_frames: int = 3
    sink_frames: int = 3
    window_frames: int = 6
    ema_alpha: float = 0.999
    timesteps: tuple[float, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    warp: bool = True
    context_t: float = 0.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(self.timesteps))
        self.cache_spec  # validates the cache sizes and alpha
        n = self.num_train_timesteps
        if not self.timesteps:
            raise ConfigError("timesteps must name at least one denoising step")
        if any(not 0 < t <= n for t in self.timesteps):
            raise ConfigError(f"timesteps must lie in (0, {n}], got {self.timesteps}")
        if self.warp and any(float(t) != int(t) for t in self.timesteps):
            raise ConfigError(f"with warp=True the timesteps index the scheduler table and must be integers, got {self.timesteps}")
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0, got {self.shift}")
        if not 0 <= self.context_t <= n:
            raise ConfigError(f"context_t must lie in [0, {n}], got {self.context_t}")

    @property
    def cache_spec(self) -> CacheSpec:
        return CacheSpec(self.chunk_frames, self.sink_frames, self.window_frames, self.ema_alpha)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def schedule(self) -> "Schedule":
        return flow_schedule(self)


@dataclass(frozen=True)
class Schedule:
    """The timesteps fed to the model and the matching noise levels, one per denoising step."""

    t: tuple[float, ...]
    sigma: tuple[float, ...]


def scheduler_table(shift: float, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Shifted flow-matching table: sigma = linspace(1, 0, n+1)[:-1]; sigma' = shift s / (1 + (shift-1) s).

    Computed in float32, as the release's FlowMatchScheduler does. Returns (timesteps, sigmas).
    """
    s = np.linspace(1.0, 0.0, n + 1, dtype=np.float32)[:-1]
    s = (np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s)).astype(np.float32)
    return (s * np.float32(n)).astype(np.float32), s


def flow_schedule(settings: StreamSettings) -> Schedule:
    """Timesteps and sigmas of the denoising steps (with warping: [1000, 937.5, 833.33, 625.0])."""
    n = settings.num_train_timesteps
    table_t, table_s = scheduler_table(settings.shift, n)
    if settings.warp:
        padded = np.concatenate([table_t, np.zeros(1, np.float32)])
        ts = [float(padded[n - int(t)]) for t in settings.timesteps]
    else:
        ts = [float(t) for t in settings.timesteps]
    # sigma of a timestep = the table entry nearest to it (as the release's scheduler looks it up)
    sigmas = [float(table_s[int(np.argmin(np.abs(table_t - np.float32(t))))]) for t in ts]
    return Schedule(tuple(ts), tuple(sigmas))


def x0_from_flow(x, flow, sigma: float):
    """The network predicts v = eps - x0 and x_t = (1 - sigma) x0 + sigma eps, so x0 = x_t - sigma v."""
    return x - sigma * flow


def renoise(x0, eps, sigma: float):
    """Forward-noise a clean prediction to level sigma: (1 - sigma) x0 + sigma eps."""
    return (1 - sigma) * x0 + sigma * eps


def chunk_noise(rng: np.random.Generator, settings: StreamSettings, shape_bchw: tuple[int, ...]):
    """Draw one chunk's noise from a numpy generator, in a fixed order every backend shares:
    first the initial noise [B, f, C, H, W], then the re-noise of steps 0..S-2, [S-1, B, f, C, H, W].
    """
    b, c, h, w = shape_bchw
    shape = (b, settings.chunk_frames, c, h, w)
    init = rng.standard_normal(shape, dtype=np.float32)
    fresh = rng.standard_normal((settings.num_steps - 1, *shape), dtype=np.float32)
    return init, fresh


def generate_latents(model, text_embeds, noise, renoise_noise, settings: StreamSettings | None = None):
    """Sample a whole clip with the PyTorch reference model, chunk by chunk through the KV cache.

    model: a ``CausalDiT``.
    text_embeds: [B, L, text_dim], L <= text_len (zero padded inside).
    noise: [B, F, C, H, W] initial noise of every latent frame, F a multiple of chunk_frames.
    renoise_noise: [S-1, B, F, C, H, W] the fresh noise used after step k (k = 0..S-2) of each chunk.
    Returns x0 [B, F, C, H, W], the final clean latents.
    """
    import torch

    settings = settings or StreamSettings()
    check_noise(noise, renoise_noise, settings, model.config.in_dim)
    if text_embeds.shape[0] != noise.shape[0]:
        raise InputError(f"text_embeds batch ({text_embeds.shape[0]}) != noise batch ({noise.shape[0]})")
    with torch.no_grad():
        rollout = ChunkRollout.for_prompt(model, text_embeds, noise.shape, settings)
        out = torch.empty_like(noise)
        c = settings.chunk_frames
        for i in range(noise.shape[1] // c):
            frames = slice(i * c, (i + 1) * c)
            out[:, frames] = rollout.step(noise[:, frames], renoise_noise[:, :, frames])
    return out


def check_noise(noise, renoise_noise, settings: StreamSettings, channels: int):
    s, c = settings.num_steps, settings.chunk_frames
    if noise.ndim != 5 or noise.shape[2] != channels:
        raise InputError(f"noise must be [B, F, {channels}, H, W], got {tuple(noise.shape)}")
    if noise.shape[1] == 0 or noise.shape[1] % c:
        raise InputError(f"the number of latent frames ({noise.shape[1]}) must be a positive multiple of "
                         f"chunk_frames ({c}): pad or trim the noise to whole chunks")
    want = (s - 1, *noise.shape)
    if tuple(renoise_noise.shape) != want:
        raise InputError(f"renoise must be [S-1, B, F, C, H, W] = {want} for {s} steps, got {tuple(renoise_noise.shape)}")


class ChunkRollout:
    """The reference streaming loop of one stream, one chunk per ``step``: the denoising steps,
    then the clean-context pass, then the cache commit. Holds the text K/V and the KV cache."""

    def __init__(self, model, text_kv, batch: int, latent_hw: tuple[int, int], settings: StreamSettings):
        import torch

        self.model, self.settings = model, settings
        self.schedule = settings.schedule()
        self.spec = settings.cache_spec
        cfg = model.config
        self.text_k, self.text_v = text_kv
        self.tokens_per_frame = model.tokens_per_frame(latent_hw)
        shape = (cfg.num_layers, batch, self.spec.context_frames * self.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        like = self.text_k
        self.cache_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.cache_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.chunks_committed = 0

    @classmethod
    def for_prompt(cls, model, text_embeds, latent_shape, settings: StreamSettings):
        """Start a rollout from text embeddings [B, L, text_dim] for latents of ``latent_shape``."""
        dtype = model.patch_embedding.weight.dtype
        text_kv = model.text_kv(text_embeds.to(device=model.patch_embedding.weight.device, dtype=dtype))
        return cls(model, text_kv, latent_shape[0], tuple(latent_shape[-2:]), settings)

    def _times(self, x, t: float):
        import torch

        return torch.full(x.shape[:2], float(t), dtype=torch.float32, device=x.device)

    def denoise_step(self, x, k: int, eps=None):
        """Step k on chunk latents x [B, f, C, H, W] -> (x0, x re-noised with eps to the next sigma or None).

        eps=None stops after x0 (the last step, or a training rollout's exit step)."""
        sched = self.schedule
        valid = self.spec.valid_frames(self.chunks_committed)
        flow, _, _ = self.model.forward_chunk(x, self._times(x, sched.t[k]), self.text_k, self.text_v,
                                              self.cache_k, self.cache_v, valid)
        x0 = x0_from_flow(x, flow, sched.sigma[k])
        if k + 1 == len(sched.t) or eps is None:
            return x0, None
        return x0, renoise(x0, eps, sched.sigma[k + 1])

    def denoise(self, x, eps):
        """All denoising steps from the chunk's initial noise x; eps [S-1, B, f, C, H, W] is the re-noise."""
        for k in range(self.settings.num_steps):
            x0, x = self.denoise_step(x, k, eps[k] if k + 1 < self.settings.num_steps else None)
        return x0

    def cache_pass(self, x0):
        """Rerun the clean chunk at t = context_t to write its K/V into the cache (clean context)."""
        valid = self.spec.valid_frames(self.chunks_committed)
        _, k, v = self.model.forward_chunk(x0, self._times(x0, self.settings.context_t), self.text_k, self.text_v,
                                           self.cache_k, self.cache_v, valid)
        commit_chunk(self.spec, self.chunks_committed, self.cache_k, k, self.tokens_per_frame)
        commit_chunk(self.spec, self.chunks_committed, self.cache_v, v, self.tokens_per_frame)
        self.chunks_committed += 1

    def step(self, x, eps):
        x0 = self.denoise(x, eps)
        self.cache_pass(x0)
        return x0
