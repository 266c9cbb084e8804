"""Lowering the DiT chunk step to a static-shape ONNX graph (issue 3, first piece).

The graph is one denoising step (or the t=0 cache pass) of one chunk, with everything that
changes from chunk to chunk as an input: the cache contents, which cache frames are valid, and
the RoPE tables of the cache slots and of the chunk. One graph therefore serves chunk 0, chunk 1,
the steady state, every denoising step and the cache pass. The timestep sinusoid is computed on
the host in float64 (``t_freq``), as the reference does; graphs have no float64.

Inputs (B = 1, f = chunk frames, T = tokens per frame, M = context frames):
  x, eps [1, f, C, H, W]; t_freq [1, f, freq_dim]; sigma, sigma_next [1];
  text_k, text_v [L, 1, text_len, N, D]; ctx_k, ctx_v [L, 1, M*T, N, D];
  key_mask [(M + f) * T] float (1 = valid key); cos_ctx, sin_ctx [M*T, D]; cos_q, sin_q [f*T, D]
Outputs: x0 = x - sigma * flow; x_next = (1 - sigma_next) * x0 + sigma_next * eps;
  new_k, new_v [L, 1, f*T, N, D] (the chunk's keys/values before RoPE).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from rf_runtime import graph_io
from rf_runtime.models.dit import CausalDiT
from rf_runtime.positions import chunk_tables, timestep_sinusoid_np

INPUTS = list(graph_io.DIT_STEP_INPUTS)
OUTPUTS = list(graph_io.DIT_STEP_OUTPUTS)


class SamplerUpdate(nn.Module):
    """The sampler's x0 / re-noise arithmetic (rf_runtime.sampler.x0_from_flow, renoise) as a module,
    so that its nodes carry their own scope (the low-precision variants keep them in float32)."""

    def forward(self, x, flow, sigma, sigma_next, eps):
        x0 = x - sigma * flow
        return x0, (1 - sigma_next) * x0 + sigma_next * eps


class DiTStep(nn.Module):
    """CausalDiT.forward_chunk_tables plus the sampler's x0 / re-noise math, for export."""

    def __init__(self, model: CausalDiT):
        super().__init__()
        self.model = model
        self.sampler_update = SamplerUpdate()

    def forward(
        self,
        x,
        eps,
        t_freq,
        sigma,
        sigma_next,
        text_k,
        text_v,
        ctx_k,
        ctx_v,
        key_mask,
        cos_ctx,
        sin_ctx,
        cos_q,
        sin_q,
    ):
        m = self.model
        if t_freq.shape[0] != x.shape[0]:  # a batched graph: every row at the same step
            t_freq = t_freq.expand(x.shape[0], -1, -1)
        e = m.time_embedding(t_freq)
        e0 = m.time_projection(e).unflatten(-1, (6, m.config.dim))
        flow, new_k, new_v = m.forward_chunk_tables(
            x,
            None,
            text_k,
            text_v,
            ctx_k,
            ctx_v,
            key_mask > 0.5,
            cos_ctx,
            sin_ctx,
            cos_q,
            sin_q,
            time_emb=(e, e0),
        )
        x0, x_next = self.sampler_update(x, flow.to(x.dtype), sigma, sigma_next, eps)
        return x0, x_next, new_k, new_v


def example_inputs(
    model: CausalDiT,
    latent_hw,
    context_frames: int,
    chunk_frames: int,
    valid_frames: int,
    seed=0,
    batch: int = 1,
):
    """Random but well-formed inputs of the step graph (numpy float32), for tracing and tests.

    batch > 1: the inputs of a batched graph (``graph_io.BATCHED_GRAPHS``): ``batch`` rows, each with
    its own cache-state tables (``key_mask`` [B, K], ``cos_q`` / ``sin_q`` [B, f*T, D])."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    h, w = model.grid(latent_hw)
    tpf = h * w
    lat = (batch, chunk_frames, cfg.in_dim, *latent_hw)
    kv = (cfg.num_layers, batch, context_frames * tpf, cfg.num_heads, cfg.head_dim)
    text = (cfg.num_layers, batch, cfg.text_len, cfg.num_heads, cfg.head_dim)
    t = np.full((1, chunk_frames), 937.5)
    f32 = np.float32
    tables = chunk_tables(context_frames, chunk_frames, valid_frames, (h, w), cfg.head_dim)
    if batch > 1:
        for name in graph_io.STATE_TABLES:
            tables[name] = np.repeat(tables[name][None], batch, axis=0)
    return {
        "x": rng.standard_normal(lat, dtype=f32),
        "eps": rng.standard_normal(lat, dtype=f32),
        "t_freq": timestep_sinusoid_np(t, cfg.freq_dim).astype(f32),
        "sigma": np.array([0.9375], f32),
        "sigma_next": np.array([0.8333], f32),
        "text_k": rng.standard_normal(text, dtype=f32),
        "text_v": rng.standard_normal(text, dtype=f32),
        "ctx_k": rng.standard_normal(kv, dtype=f32),
        "ctx_v": rng.standard_normal(kv, dtype=f32),
        **tables,
    }


def export_dit_step(model: CausalDiT, path: str, feeds: dict, opset: int = 17) -> list[str]:
    """Export the step graph with the static shapes of ``feeds`` (see ``example_inputs``; numpy arrays
    or torch tensors, e.g. a zero expanded to a large input's shape).

    Returns the external-data files written beside ``path``: none for small models, one
    ``dit_step.onnx.data`` when the graph is over protobuf's 2 GB (the 1.3B model in fp32).
    """
    import os

    import onnx

    from rf_runtime.export.onnx_files import save_onnx, save_streamed, traced_in_scratch

    step = DiTStep(model.eval())
    args = tuple(v if isinstance(v := feeds[name], torch.Tensor) else torch.from_numpy(v) for name in INPUTS)
    # torch writes a > 2 GB graph with one file per tensor: export apart, then save with one data file
    with traced_in_scratch(step, args, path, INPUTS, OUTPUTS, opset) as (raw, scratch):
        if any(f != os.path.basename(raw) for f in os.listdir(scratch)):  # > 2 GB: torch wrote data files
            return save_streamed(raw, path)  # byte copies: the weights are never loaded
        return save_onnx(onnx.load(raw), path)


class CacheUpdate(nn.Module):
    """The cache commit as a graph: new context = mix @ concat(context, chunk), frame by frame.

    ``mix`` is ``rf_runtime.cache.commit_matrix(spec, chunks_committed)`` (float32 [M, M + f]), so
    the write, the eviction and the EMA-Sink fold of any cache state are one static graph.
    """

    def __init__(self, tokens_per_frame: int):
        super().__init__()
        self.tokens_per_frame = tokens_per_frame

    def forward(self, ctx_k, ctx_v, new_k, new_v, mix):
        # mix [M, M + f] for one row, [B, M, M + f] for a batched graph (each row its own cache state)
        pattern = "ij,lbjtnd->lbitnd" if mix.ndim == 2 else "bij,lbjtnd->lbitnd"

        def update(ctx, new):
            frames = torch.cat([ctx, new], dim=2).unflatten(
                2, (-1, self.tokens_per_frame)
            )  # [L, B, M+f, T, N, D]
            return torch.einsum(pattern, mix, frames).flatten(2, 3)

        return update(ctx_k, new_k), update(ctx_v, new_v)


class TextKV(nn.Module):
    """Text embeddings [1, text_len, text_dim] -> cross-attention K/V of every layer (once per prompt)."""

    def __init__(self, model: CausalDiT):
        super().__init__()
        self.model = model

    def forward(self, text_embeds):
        return self.model.text_kv(text_embeds)


def export_cache_update(tokens_per_frame: int, path: str, feeds: dict, opset: int = 17) -> None:
    names = list(graph_io.CACHE_UPDATE_INPUTS)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    with torch.no_grad():
        torch.onnx.export(
            CacheUpdate(tokens_per_frame),
            args,
            path,
            input_names=names,
            output_names=list(graph_io.CACHE_UPDATE_OUTPUTS),
            opset_version=opset,
            dynamo=False,
        )


def export_text_kv(model: CausalDiT, path: str, opset: int = 17) -> None:
    cfg = model.config
    embeds = torch.zeros(1, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        torch.onnx.export(
            TextKV(model.eval()),
            (embeds,),
            path,
            input_names=list(graph_io.TEXT_KV_INPUTS),
            output_names=list(graph_io.TEXT_KV_OUTPUTS),
            opset_version=opset,
            dynamo=False,
        )
