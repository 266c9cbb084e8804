"""Rewarded distribution matching distillation (Re-DMD) losses, SPEC section 6.

Notation (per sample b of a batch of latent videos [B, F, C, H, W]):

    x0      the generator's clean prediction (its rollout's exit-step output)
    t       one timestep for all frames, t ~ U{0..999}, shifted (shift 5), clamped to [20, 980]
    s       the noise level of t, looked up in the shifted flow-matching table (as the release does)
    x_t     = (1 - s) x0 + s eps                                          (forward noising)
    real    = cond + g (cond - uncond)    teacher x0 predictions, CFG g = 3.0, negative prompt = uncond
    fake    = critic x0 prediction, conditional only
    grad    = (fake - real) / mean_{C,F,H,W} |x0 - real|,   NaNs zeroed  (DMD eqs. 7-8)
    w       = exp(r / beta) / Z,   Z = 1 (release) or mean_b exp(r_b / beta)   (Re-DMD weighting)
    L_gen   = mean_b  0.5 * w_b * mean_{C,F,H,W} (x0 - sg(x0 - grad))^2
    L_crit  = mean ((x_t - fake_x0) / s - (eps - x0))^2                  (flow matching on rollouts)

Since d/dx0 of 0.5 * mean (x0 - sg(x0 - grad))^2 = grad / N, the generator gradient is w times the
DMD gradient, sample by sample. The reward never carries a gradient.

Every function returns plain tensors (or ``(loss, logs)`` for the losses); the models are passed in
as callables ``score(x_t, t [B, F], text_embeds) -> flow`` (the bidirectional ``forward_full``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rf_runtime.errors import ConfigError, InputError
from rf_runtime.sampler import scheduler_table, x0_from_flow


@dataclass(frozen=True)
class DMDSettings:
    """The DMD hyper-parameters of the release (configs/reward_forcing.yaml)."""

    guidance_scale: float = 3.0  # teacher CFG
    timestep_shift: float = 5.0  # applied to the DMD / critic timesteps
    min_timestep: float = 20.0  # clamp, = 0.02 * 1000
    max_timestep: float = 980.0  # clamp, = 0.98 * 1000
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not self.timestep_shift > 0:
            raise ConfigError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise ConfigError(
                f"need 0 <= min_timestep < max_timestep <= {self.num_train_timesteps}, got "
                f"{self.min_timestep}, {self.max_timestep}"
            )


# --------------------------------------------------------------------------------------------
# Timesteps and noise
# --------------------------------------------------------------------------------------------


def shift_timestep(t: torch.Tensor, shift: float, n: int = 1000) -> torch.Tensor:
    """t' = n * shift (t/n) / (1 + (shift - 1) t/n): the shifted flow-matching timestep."""
    u = t / n
    return n * shift * u / (1 + (shift - 1) * u)


def sample_timesteps(
    batch: int, settings: DMDSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One DMD timestep per sample: t ~ U{0, ..., n-1}, shifted, clamped to [min, max]. -> [B] float32 (CPU)."""
    n = settings.num_train_timesteps
    t = torch.randint(0, n, (batch,), generator=generator).to(torch.float32)
    return shift_timestep(t, settings.timestep_shift, n).clamp(settings.min_timestep, settings.max_timestep)


def sigma_of(t: torch.Tensor, settings: DMDSettings) -> torch.Tensor:
    """Noise level of each timestep: the nearest entry of the shifted table (the release's add_noise)."""
    table_t, table_s = scheduler_table(settings.timestep_shift, settings.num_train_timesteps)
    tt = torch.from_numpy(table_t).to(t.device)
    index = (tt[None, :] - t.to(torch.float32)[:, None]).abs().argmin(dim=1)
    return torch.from_numpy(np.ascontiguousarray(table_s)).to(t.device)[index]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps with one s per sample; x0, eps [B, ...], sigma [B]."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * eps


def _per_frame(t: torch.Tensor, frames: int) -> torch.Tensor:
    return t[:, None].expand(t.shape[0], frames)


# --------------------------------------------------------------------------------------------
# DMD gradient
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def dmd_gradient(x0, t, sigma, eps, teacher, critic, text_cond, text_uncond, guidance_scale: float):
    """The normalised DMD gradient (DMD eqs. 7-8) for clean latents x0 [B, F, C, H, W].

    teacher, critic: ``score(x_t, t [B, F], text_embeds) -> flow [B, F, C, H, W]`` (v = eps - x0).
    t, sigma: [B]; eps: noise like x0; text_cond / text_uncond: [B, L, text_dim] (uncond = negative prompt).
    Returns (grad [B, F, C, H, W] float32, logs).
    """
    x0 = x0.detach()
    x_t = add_noise(x0, eps, sigma)
    tf = _per_frame(t, x0.shape[1])
    s = sigma.float().view(-1, 1, 1, 1, 1)
    # fake score: the critic, conditional only
    fake = x0_from_flow(x_t.float(), critic(x_t, tf, text_cond).float(), s)
    # real score: the teacher with classifier-free guidance against the negative prompt
    # (conditional and unconditional in one batched call)
    flows = teacher(torch.cat([x_t, x_t]), torch.cat([tf, tf]), torch.cat([text_cond, text_uncond])).float()
    real_cond, real_uncond = (x0_from_flow(x_t.float(), f, s) for f in flows.chunk(2))
    real = real_cond + guidance_scale * (real_cond - real_uncond)
    # DMD eq. 7 (KL gradient), normalised per sample by eq. 8
    normalizer = (x0.float() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = torch.nan_to_num((fake - real) / normalizer)
    return grad, {"dmd_grad_abs_mean": grad.abs().mean(), "dmd_timestep_mean": t.float().mean()}


# --------------------------------------------------------------------------------------------
# Reward weighting and losses
# --------------------------------------------------------------------------------------------


def reward_weights(reward: torch.Tensor, beta: float, normalize: bool, z: torch.Tensor | None = None):
    """Re-DMD weights w = exp(r / beta) / Z (no gradient through the reward).

    normalize=False: Z = 1 (the release, exp(2 r) with beta = 1/2, batch 1 per GPU).
    normalize=True: Z = mean of exp(r / beta) over the batch; pass ``z`` to use a Z computed over
    a larger (e.g. all-ranks) batch. Computed in float64 with the max subtracted when normalising.
    Returns (w [B] float32, logs with the reward statistics).
    """
    if not beta > 0:
        raise ConfigError(f"reward beta must be > 0, got {beta}")
    r = reward.detach().to(torch.float64).reshape(-1)
    if normalize:
        if z is None:
            z = torch.exp(r / beta).mean()
        w = torch.exp(r / beta) / z
    else:
        w = torch.exp(r / beta)
    logs = {
        "reward_mean": r.mean(),
        "reward_std": r.std(unbiased=False),
        "reward_min": r.min(),
        "reward_max": r.max(),
        "weight_mean": w.mean(),
        "weight_max": w.max(),
    }
    return w.to(torch.float32), logs


def generator_loss(x0: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor | None = None):
    """Re-DMD generator loss: mean_b 0.5 * w_b * MSE_b(x0, sg(x0 - grad)); w = 1 gives plain DMD.

    x0 [B, F, C, H, W] carries the generator's gradient; grad from ``dmd_gradient``; weights [B] or None.
    Computed in float64, as the release does. Returns (loss, logs).
    """
    if x0.shape != grad.shape:
        raise InputError(f"x0 {tuple(x0.shape)} and grad {tuple(grad.shape)} must have the same shape")
    x = x0.double()
    target = (x - grad.double()).detach()
    per_sample = 0.5 * ((x - target) ** 2).mean(dim=tuple(range(1, x.ndim)))  # [B]
    dmd = per_sample.mean()
    if weights is None:
        loss = dmd
    else:
        loss = (weights.detach().double().to(x.device) * per_sample).mean()
    return loss, {"generator_loss": loss.detach(), "dmd_loss": dmd.detach()}


def critic_loss(critic, x0, t, sigma, eps, text_cond):
    """Flow-matching loss of the critic on the generator's samples (x0 without gradient):
    mean(((x_t - fake_x0) / s - (eps - x0))^2). Returns (loss, logs)."""
    x0 = x0.detach()
    x_t = add_noise(x0, eps, sigma)
    s = sigma.float().view(-1, 1, 1, 1, 1)
    fake_x0 = x0_from_flow(x_t.float(), critic(x_t, _per_frame(t, x0.shape[1]), text_cond).float(), s)
    loss = (((x_t.float() - fake_x0) / s - (eps.float() - x0.float())) ** 2).mean()
    return loss, {"critic_loss": loss.detach(), "critic_timestep_mean": t.float().mean()}
