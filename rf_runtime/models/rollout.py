"""The streaming chunk loop in PyTorch, written once (SPEC section 2; the runtime's ``Stream`` runs the
same recipe over the backend interface).

Per chunk: the denoising steps (x0 = x_t - sigma v, re-noised to the next sigma), then the clean
chunk's pass at t = context_t, which commits its keys/values into the sink + window cache. A
``ChunkRollout`` holds one stream's text K/V and KV cache and runs those steps; ``chunk_loop`` is
the loop over chunks that every caller shares:

- the torch backend drives a ``ChunkRollout`` step by step (``Stream`` owns its loop);
- ``generate_latents``: inference on a whole clip (every step, no gradient);
- ``rf_runtime.train.rollout.self_forcing_rollout``: the student's own rollout, stopped at one exit
  step with gradient only there;
- the world's teacher-forced student loss (``rf_runtime.world.training.student_loss``): each chunk
  predicted from noised data, the data's clean chunk committed.
"""

from __future__ import annotations

from typing import Callable

import torch

from rf_runtime.cache import commit_chunk
from rf_runtime.errors import InputError
from rf_runtime.sampler import StreamSettings, check_noise, renoise, x0_from_flow


class ChunkRollout:
    """One stream's reference state and steps: the text K/V, the KV cache, the chunks committed so far."""

    def __init__(self, model, text_kv, batch: int, latent_hw: tuple[int, int], settings: StreamSettings):
        self.model, self.settings = model, settings
        self.schedule = settings.schedule()
        self.spec = settings.cache_spec
        cfg = model.config
        self.text_k, self.text_v = text_kv
        self.tokens_per_frame = model.tokens_per_frame(latent_hw)
        shape = (
            cfg.num_layers,
            batch,
            self.spec.context_frames * self.tokens_per_frame,
            cfg.num_heads,
            cfg.head_dim,
        )
        like = self.text_k
        self.cache_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.cache_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.chunks_committed = 0

    @classmethod
    def for_prompt(cls, model, text_embeds, latent_shape, settings: StreamSettings) -> "ChunkRollout":
        """Start a rollout from text embeddings [B, L, text_dim] for latents of ``latent_shape``."""
        dtype = model.patch_embedding.weight.dtype
        text_kv = model.text_kv(text_embeds.to(device=model.patch_embedding.weight.device, dtype=dtype))
        return cls(model, text_kv, latent_shape[0], tuple(latent_shape[-2:]), settings)

    def predict(self, x, t, *, copy_cache: bool = False):
        """The flow prediction v for chunk latents x [B, f, C, H, W] at timesteps t [B, f] (or a number),
        attending to the cache as it stands. ``copy_cache``: read a copy, so that the cache can be
        updated in place later without touching the autograd graph of this prediction."""
        if not isinstance(t, torch.Tensor):
            t = torch.full(x.shape[:2], float(t), dtype=torch.float32, device=x.device)
        cache_k, cache_v = (
            (self.cache_k.clone(), self.cache_v.clone()) if copy_cache else (self.cache_k, self.cache_v)
        )
        valid = self.spec.valid_frames(self.chunks_committed)
        flow, _, _ = self.model.forward_chunk(x, t, self.text_k, self.text_v, cache_k, cache_v, valid)
        return flow

    def denoise_step(self, x, k: int, eps=None):
        """Step k on chunk latents x [B, f, C, H, W] -> (x0, x re-noised with eps to the next sigma or None).

        eps=None stops after x0 (the last step, or a training rollout's exit step)."""
        sched = self.schedule
        x0 = x0_from_flow(x, self.predict(x, sched.t[k]), sched.sigma[k])
        if k + 1 == len(sched.t) or eps is None:
            return x0, None
        return x0, renoise(x0, eps, sched.sigma[k + 1])

    def denoise(self, x, eps, exit_step: int | None = None, with_grad: bool = False):
        """The denoising steps of one chunk from its initial noise x, up to ``exit_step`` (default: all).

        eps [S-1, B, f, C, H, W]: the fresh noise after each step. The steps before the exit step run
        without gradient, the exit step with gradient when ``with_grad`` (Self Forcing)."""
        last = self.settings.num_steps - 1 if exit_step is None else exit_step
        with torch.no_grad():
            for k in range(last):
                _, x = self.denoise_step(x, k, eps[k])
        with torch.set_grad_enabled(with_grad):
            x0, _ = self.denoise_step(x, last, None)
        return x0

    def cache_pass(self, x0) -> None:
        """Rerun the clean chunk at t = context_t to write its K/V into the cache (clean context)."""
        valid = self.spec.valid_frames(self.chunks_committed)
        t = torch.full(x0.shape[:2], float(self.settings.context_t), dtype=torch.float32, device=x0.device)
        _, k, v = self.model.forward_chunk(x0, t, self.text_k, self.text_v, self.cache_k, self.cache_v, valid)
        commit_chunk(self.spec, self.chunks_committed, self.cache_k, k, self.tokens_per_frame)
        commit_chunk(self.spec, self.chunks_committed, self.cache_v, v, self.tokens_per_frame)
        self.chunks_committed += 1


def chunk_loop(rollout: ChunkRollout, num_chunks: int, chunk: Callable[[int], tuple]) -> list:
    """The chunk loop: for chunk i = 0, 1, ..., ``chunk(i)`` returns (clean latents, result) against the
    cache as it stands; the clean latents are then committed by the clean-context pass, without
    gradient. Returns the results in order."""
    results = []
    for i in range(num_chunks):
        clean, result = chunk(i)
        results.append(result)
        with torch.no_grad():
            # rerun with timestep zero to update the KV cache using clean context
            rollout.cache_pass(clean.detach())
    return results


def rollout_clip(
    model,
    text_embeds,
    noise,
    renoise_noise,
    settings: StreamSettings,
    *,
    exit_step: int | None = None,
    with_grad: bool = False,
) -> torch.Tensor:
    """A whole clip through ``chunk_loop``: every chunk denoised from its noise up to ``exit_step``.

    noise [B, F, C, H, W], F a multiple of chunk_frames; renoise_noise [S-1, B, F, C, H, W].
    Returns x0 [B, F, C, H, W] (with gradient through each chunk's exit step when ``with_grad``).
    """
    check_noise(noise, renoise_noise, settings, model.config.in_dim)
    if text_embeds.shape[0] != noise.shape[0]:
        raise InputError(f"text_embeds batch ({text_embeds.shape[0]}) != noise batch ({noise.shape[0]})")
    if exit_step is not None and not 0 <= exit_step < settings.num_steps:
        raise InputError(f"exit_step must be in [0, {settings.num_steps - 1}], got {exit_step}")
    with torch.set_grad_enabled(with_grad):
        rollout = ChunkRollout.for_prompt(model, text_embeds, noise.shape, settings)
    c = settings.chunk_frames

    def chunk(i):
        frames = slice(i * c, (i + 1) * c)
        x0 = rollout.denoise(noise[:, frames], renoise_noise[:, :, frames], exit_step, with_grad)
        return x0, x0

    return torch.cat(chunk_loop(rollout, noise.shape[1] // c, chunk), dim=1)


def generate_latents(model, text_embeds, noise, renoise_noise, settings: StreamSettings | None = None):
    """Sample a whole clip with the PyTorch reference model, chunk by chunk through the KV cache.

    model: a ``CausalDiT``.
    text_embeds: [B, L, text_dim], L <= text_len (zero padded inside).
    noise: [B, F, C, H, W] initial noise of every latent frame, F a multiple of chunk_frames.
    renoise_noise: [S-1, B, F, C, H, W] the fresh noise used after step k (k = 0..S-2) of each chunk.
    Returns x0 [B, F, C, H, W], the final clean latents.
    """
    return rollout_clip(model, text_embeds, noise, renoise_noise, settings or StreamSettings())
