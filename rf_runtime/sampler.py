"""Few-step flow-matching sampling of a stream, chunk by chunk (SPEC section 2): the settings, the
schedule, the shift warp, the x0 / re-noise math and the noise draws.

Plain numpy and Python, shared by every backend (no torch: the functions on arrays use operators
only, so they take torch tensors too). The PyTorch chunk loop is ``rf_runtime.models.rollout``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from rf_runtime.cache import CacheSpec
from rf_runtime.errors import ConfigError, InputError
from rf_runtime.files import json_ready


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
            raise ConfigError(
                f"with warp=True the timesteps index the scheduler table and must be integers, got {self.timesteps}"
            )
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0, got {self.shift}")
        if not 0 <= self.context_t <= n:
            raise ConfigError(f"context_t must lie in [0, {n}], got {self.context_t}")

    @classmethod
    def check_names(cls, settings: dict, where: str = "the stream settings") -> None:
        """Refuse keys that are not settings (a typo would otherwise be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(settings) - names
        if bad:
            raise ConfigError(f"{where}: unknown stream settings {sorted(bad)}; valid are {sorted(names)}")

    @classmethod
    def from_dict(cls, settings: dict, where: str = "the stream settings") -> "StreamSettings":
        """From the JSON form (``to_dict``; lists for tuples); keys left out take their defaults."""
        cls.check_names(settings, where)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})

    def to_dict(self) -> dict:
        """The JSON form: every setting, tuples as lists."""
        return json_ready(self)

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
    s = shift_sigma(s, float(shift)).astype(np.float32)  # a Python float: computed in float32 (NEP 50)
    return (s * np.float32(n)).astype(np.float32), s


def shift_sigma(s, shift: float):
    """s' = shift s / (1 + (shift - 1) s): the flow-matching noise-level warp (SPEC 2), elementwise.

    Operators only, so it computes in the type of ``s`` and ``shift`` (float32 for the scheduler
    table; numpy float64 or torch tensors for training draws)."""
    return shift * s / (1 + (shift - 1) * s)


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


def chunk_noise(rng: np.random.Generator, settings: StreamSettings, shape_bchw: tuple[int, ...], out=None):
    """Draw one chunk's noise from a numpy generator, in a fixed order every backend shares:
    first the initial noise [B, f, C, H, W], then the re-noise of steps 0..S-2, [S-1, B, f, C, H, W].

    ``out``: (init, fresh) float32 arrays of those shapes to fill in place (no allocation), as returned
    by an earlier call; the draws are the same as into new arrays.
    """
    if out is None:
        b, c, h, w = shape_bchw
        shape = (b, settings.chunk_frames, c, h, w)
        out = np.empty(shape, np.float32), np.empty((settings.num_steps - 1, *shape), np.float32)
    init, fresh = out
    rng.standard_normal(dtype=np.float32, out=init)
    rng.standard_normal(dtype=np.float32, out=fresh)
    return init, fresh


def check_noise(noise, renoise_noise, settings: StreamSettings, channels: int):
    s, c = settings.num_steps, settings.chunk_frames
    if noise.ndim != 5 or noise.shape[2] != channels:
        raise InputError(f"noise must be [B, F, {channels}, H, W], got {tuple(noise.shape)}")
    if noise.shape[1] == 0 or noise.shape[1] % c:
        raise InputError(
            f"the number of latent frames ({noise.shape[1]}) must be a positive multiple of "
            f"chunk_frames ({c}): pad or trim the noise to whole chunks"
        )
    want = (s - 1, *noise.shape)
    if tuple(renoise_noise.shape) != want:
        raise InputError(
            f"renoise must be [S-1, B, F, C, H, W] = {want} for {s} steps, got {tuple(renoise_noise.shape)}"
        )
