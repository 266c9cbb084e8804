"""The student's own autoregressive rollout (Self Forcing), through the inference cache code.

The student generates a clip chunk by chunk exactly as the runtime streams it
(``rf_runtime.models.rollout.chunk_loop``: the denoising steps, the clean-context pass at t = 0, the
commit into the sink + window cache), except that every chunk stops at one *exit step* k, drawn
once per rollout and shared by all chunks (and by all ranks). Only the exit step of each chunk
runs with gradient; the steps before it and the clean-context cache pass run without, so the
gradient reaches the parameters through each chunk's exit-step prediction only (the cache it
attends to is a constant, as in Self Forcing).

EMA-Sink folds during training. The release trains on 21 latent frames with a KV cache as long as
the clip, so nothing is ever evicted: every chunk attends to the static sink plus the last window
frames, and the EMA fold only happens at inference. ``fold_in_training=False`` reproduces that
(the rollout runs with ``ema_alpha = 1``: evicted chunks leave the window and the sink stays
chunk 0's, which is the same attention as the release). ``fold_in_training=True`` keeps the
model's ``ema_alpha``, so every chunk after the window is full sees a sink that has absorbed the
evicted chunks, as it will at inference; with rollouts longer than the sink + window (e.g. 21
frames = 7 chunks with 3 + 6 frames), the student is trained on the cache states it meets when
streaming for long. The fold itself is gradient-free (the cache is written without gradient).
"""

from __future__ import annotations

import dataclasses

import torch

from rf_runtime.errors import InputError
from rf_runtime.models.rollout import rollout_clip
from rf_runtime.sampler import StreamSettings


def training_settings(settings: StreamSettings, fold_in_training: bool) -> StreamSettings:
    """The cache settings a training rollout runs with (see the module docstring)."""
    return settings if fold_in_training else dataclasses.replace(settings, ema_alpha=1.0)


def sample_exit_step(num_steps: int, generator: torch.Generator) -> int:
    """The denoising step all chunks of a rollout exit at, uniform over the steps.

    Draw it from a generator seeded identically on every rank (the release broadcasts it)."""
    return int(torch.randint(0, num_steps, (1,), generator=generator))


def self_forcing_rollout(
    model,
    text_embeds: torch.Tensor,
    noise: torch.Tensor,
    renoise_noise: torch.Tensor,
    settings: StreamSettings,
    exit_step: int,
    *,
    with_grad: bool = True,
) -> torch.Tensor:
    """Generate a clip with the student's own cache and return each chunk's exit-step prediction.

    model: the causal student (``CausalDiT``); text_embeds [B, L, text_dim].
    noise [B, F, C, H, W]: every chunk's initial noise; renoise_noise [S-1, B, F, C, H, W]: the fresh
        noise after step k (as ``generate_latents`` takes them).
    exit_step: 0..S-1, shared by all chunks.
    Returns x0 [B, F, C, H, W]; with ``with_grad`` it carries the gradient of the exit steps (and of
    the text conditioning through the cross-attention K/V).
    """
    if not 0 <= exit_step < settings.num_steps:
        raise InputError(f"exit_step must be in [0, {settings.num_steps - 1}], got {exit_step}")
    return rollout_clip(
        model, text_embeds, noise, renoise_noise, settings, exit_step=exit_step, with_grad=with_grad
    )
