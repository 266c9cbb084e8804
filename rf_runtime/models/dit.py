"""The causal Wan2.1 diffusion transformer (SPEC section 1) with an explicit KV cache.

One readable file, in the spirit of nanoGPT's model.py. Two forwards share every layer:

- ``forward_chunk``: one chunk of latent frames attending to a cache of earlier chunks'
  keys/values (the streaming generator, the denoising steps and the clean-context pass);
- ``forward_full``: the whole clip with bidirectional attention (teacher and critic in training).

The cache itself (which frames are kept, eviction, the EMA-Sink fold) lives in
``rf_runtime.cache``; this module only reads a ``(context_k, context_v, context_frames)`` view of it
and returns the chunk's fresh keys/values. Keys are returned *before* RoPE (after the q/k RMSNorm),
and RoPE is applied when keys are read, by their position inside the cache (SPEC section 3).

RoPE uses real cos/sin tables, so that every graph exports to ONNX.

Shapes: B batch, F latent frames, C latent channels, H x W latent size, h x w = H/2 x W/2 patch
grid, T = h*w tokens per frame, N = num_heads, D = head_dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rf_runtime.errors import CheckpointError, ConfigError, InputError
from rf_runtime.positions import chunk_tables, rope_tables_np, sinusoid_frequencies
from rf_runtime.schema import require_finite


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Field names as in Wan2.1's ``config.json``; defaults are the 1.3B model."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type != "t2v":
            raise ConfigError(f"model_type {self.model_type!r} is not supported: only 't2v'")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1 or self.patch_size[0] != 1:
            raise ConfigError(
                f"patch_size must be (1, ph, pw) with positive ints, got {self.patch_size}: "
                "the causal model modulates and caches per latent frame"
            )
        if self.dim % self.num_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even and >= 6 for the 3D RoPE")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim ({self.freq_dim}) must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DiTConfig":
        """Read a Wan2.1 ``config.json``; keys that are not model fields are ignored."""
        with open(path) as f:
            raw = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


# --------------------------------------------------------------------------------------------
# Embeddings: timestep sinusoid and 3D RoPE tables
# --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps on the 0..1000 scale: cos then sin, base 10000, in float64.

    t: any shape -> [*t.shape, freq_dim] float64. The same numbers as ``positions.timestep_sinusoid_np``
    (the host's, which the exported graphs take as an input), computed on t's device.
    """
    inv = torch.from_numpy(sinusoid_frequencies(freq_dim)).to(
        t.device
    )  # the host's table (rf_runtime.positions)
    arg = t.to(torch.float64).unsqueeze(-1) * inv
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def rope_tables(frame_positions, grid_hw: tuple[int, int], head_dim: int):
    """cos/sin tables for tokens of frames at ``frame_positions`` on an h x w patch grid.

    Returns (cos, sin), each [len(frame_positions) * h * w, head_dim] float32 tensors, repeated per
    pair so that ``apply_rope`` is two multiplies and an add (interleaved pairs, as Wan's complex
    view). Positions are frame indices inside the cache (relative), never stream positions.
    Computed in float64 on the host (``rf_runtime.positions``), the same tables every backend uses.
    """
    positions = torch.as_tensor(frame_positions).reshape(-1).tolist()
    cos, sin = rope_tables_np(positions, grid_hw, head_dim)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle tables.

    x: [B, L, N, D]; cos, sin: [L, D] (or broadcastable [B, L, 1, D] after unsqueeze).
    """
    x_pairs = x.unflatten(-1, (-1, 2))  # [B, L, N, D/2, 2]
    rotated = torch.stack([-x_pairs[..., 1], x_pairs[..., 0]], dim=-1).flatten(-2)
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (Wan's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype (Wan's WanLayerNorm). The affine weights are
    upcast with the input: a model held in bfloat16 keeps bfloat16 weights, and torch's layer_norm needs one dtype."""

    def forward(self, x):
        if self.weight is None or self.weight.dtype == torch.float32:  # the module call: exported names stay
            return super().forward(x.float()).type_as(x)
        weight, bias = self.weight.float(), None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def attention(q, k, v, mask=None):
    """q [B, Lq, N, D], k/v [B, Lk, N, D], mask broadcastable to [B, N, Lq, Lk] (True = attend)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def qkv(self, x):
        """x [B, L, dim] -> q, k, v [B, L, N, D]; q and k after RMSNorm, before RoPE."""
        shape = (*x.shape[:2], self.num_heads, self.head_dim)
        return self.norm_q(self.q(x)).view(shape), self.norm_k(self.k(x)).view(shape), self.v(x).view(shape)


class CrossAttention(SelfAttention):
    def text_kv(self, context):
        """context [B, text_len, dim] -> k, v [B, text_len, N, D] (computed once per prompt)."""
        shape = (*context.shape[:2], self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, x, text_k, text_v):
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.num_heads, self.head_dim)
        # Cross attention attends over all text_len positions, padding included (as Wan does).
        return self.o(attention(q, text_k, text_v).flatten(2))


class Block(nn.Module):
    """One DiT block: modulated self attention, cross attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = (
            LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def text_kv(self, context):
        """This block's cross-attention K/V of a prompt (a Block method, so that a sharded block,
        e.g. under FSDP, can gather its weights for it as it does for ``forward``)."""
        return self.cross_attn.text_kv(context)

    def forward(self, x, e0, text_k, text_v, self_attention):
        """x [B, F*T, dim]; e0 [B, F, 6, dim]; self_attention(q, k, v) -> [B, F*T, N, D].

        ``self_attention`` is where the chunked and the full forward differ (which keys, which
        positions); it receives this chunk's q/k/v after RMSNorm and before RoPE.
        """
        b, f = e0.shape[:2]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation.unsqueeze(1) + e0
        ).unbind(2)

        def per_frame(y):  # [B, F*T, dim] -> [B, F, T, dim]
            return y.unflatten(1, (f, -1))

        h = (per_frame(self.norm1(x)) * (1 + scale_msa.unsqueeze(2)) + shift_msa.unsqueeze(2)).flatten(1, 2)
        q, k, v = self.self_attn.qkv(h)
        y = self.self_attn.o(self_attention(q, k, v).flatten(2))
        x = x + (per_frame(y) * gate_msa.unsqueeze(2)).flatten(1, 2)

        x = x + self.cross_attn(self.norm3(x), text_k, text_v)

        h = (per_frame(self.norm2(x)) * (1 + scale_mlp.unsqueeze(2)) + shift_mlp.unsqueeze(2)).flatten(1, 2)
        x = x + (per_frame(self.ffn(h)) * gate_mlp.unsqueeze(2)).flatten(1, 2)
        return x, k, v


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B, F*T, dim], e [B, F, dim] -> [B, F*T, prod(patch)*out_dim]."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # [B, F, dim] each
        y = self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
        return self.head(y.flatten(1, 2))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class CausalDiT(nn.Module):
    """Wan2.1 DiT with chunked causal (KV-cached) and full bidirectional forwards.

    State-dict keys are the release's key names (``patch_embedding.*``, ``blocks.{i}.self_attn.q.*``,
    ...), so Wan2.1 and Reward Forcing checkpoints load unchanged (see ``from_state_dict``).
    """

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        cfg = config or DiTConfig()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, config: DiTConfig | None = None, *, use_ema: bool = True
    ) -> "CausalDiT":
        """Build a model and load a release state dict strictly.

        Accepts Wan2.1 keys as they are, the Reward Forcing ``model.*`` keys, training checkpoints
        nested under ``generator_ema`` / ``generator`` (``use_ema`` picks which), and FSDP's
        ``_fsdp_wrapped_module.`` segments.
        """
        cfg = config or DiTConfig()
        state_dict = normalize_state_dict(state_dict, use_ema=use_ema)
        with torch.device("meta"):
            model = cls(cfg)
        check_state_dict(model, state_dict, what=f"CausalDiT({cfg})")
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        *,
        use_ema: bool = True,
    ) -> "CausalDiT":
        """Load a Wan2.1 directory (``config.json`` + ``diffusion_pytorch_model*.safetensors``),
        then, if given, a generator checkpoint on top (``.safetensors`` or ``.pt``/``.pth``)."""
        model_dir = os.fspath(model_dir)
        cfg_path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(
                f"{cfg_path} not found: pass the Wan2.1 model directory that holds config.json and "
                "diffusion_pytorch_model.safetensors"
            )
        cfg = DiTConfig.from_json(cfg_path)
        weights = sorted(
            p
            for p in os.listdir(model_dir)
            if p.startswith("diffusion_pytorch_model") and p.endswith(".safetensors")
        )
        if checkpoint is None and not weights:
            raise CheckpointError(f"no diffusion_pytorch_model*.safetensors in {model_dir}")
        if checkpoint is not None:
            state = load_checkpoint_file(checkpoint)
        else:
            state = {}
            for name in weights:
                state.update(load_checkpoint_file(os.path.join(model_dir, name)))
        return cls.from_state_dict(state, cfg, use_ema=use_ema)

    # ---- shared pieces -------------------------------------------------------------------

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) of a latent of size (H, W)."""
        _, ph, pw = self.config.patch_size
        return latent_hw[0] // ph, latent_hw[1] // pw

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        h, w = self.grid(latent_hw)
        return h * w

    def text_context(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """text_embeds [B, L, text_dim], L <= text_len -> zero padded to text_len -> [B, text_len, dim]."""
        cfg = self.config
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != cfg.text_dim:
            raise InputError(f"text_embeds must be [B, L, {cfg.text_dim}], got {tuple(text_embeds.shape)}")
        if text_embeds.shape[1] > cfg.text_len:
            raise InputError(
                f"text_embeds has {text_embeds.shape[1]} positions, more than text_len={cfg.text_len}"
            )
        pad = cfg.text_len - text_embeds.shape[1]
        if pad:
            text_embeds = F.pad(text_embeds, (0, 0, 0, pad))
        return self.text_embedding(text_embeds.to(self.patch_embedding.weight.dtype))

    def text_kv(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of every layer, computed once per prompt.

        -> (k, v), each [num_layers, B, text_len, N, D].
        """
        ctx = self.text_context(text_embeds)
        ks, vs = zip(*(blk.text_kv(ctx) for blk in self.blocks))
        return torch.stack(ks), torch.stack(vs)

    def time_embeddings(self, t: torch.Tensor):
        """t [B, F] on the 0..1000 scale -> e [B, F, dim], e0 [B, F, 6, dim]."""
        dtype = self.patch_embedding.weight.dtype
        e = self.time_embedding(timestep_sinusoid(t, self.config.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, F, C, H, W] -> tokens [B, F*h*w, dim]."""
        x = self.patch_embedding(x.transpose(1, 2).to(self.patch_embedding.weight.dtype))  # [B, dim, F, h, w]
        return x.flatten(2).transpose(1, 2)

    def unpatchify(self, y: torch.Tensor, frames: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """y [B, F*h*w, pt*ph*pw*C] -> [B, F, C, H, W]."""
        _, ph, pw = self.config.patch_size
        h, w = self.grid(latent_hw)
        c = self.config.out_dim
        y = y.view(y.shape[0], frames, h, w, ph, pw, c)
        y = torch.einsum("bfhwqrc->bfchqwr", y)
        return y.reshape(y.shape[0], frames, c, h * ph, w * pw)

    def _check_latents(self, x: torch.Tensor, t: torch.Tensor):
        cfg = self.config
        if x.ndim != 5 or x.shape[2] != cfg.in_dim:
            raise InputError(f"latents must be [B, F, {cfg.in_dim}, H, W], got {tuple(x.shape)}")
        _, ph, pw = cfg.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise InputError(
                f"latent size {x.shape[3]}x{x.shape[4]} is not a multiple of the patch size {ph}x{pw}"
            )
        if t.shape != x.shape[:2]:
            raise InputError(f"t must be per latent frame, shape {tuple(x.shape[:2])}, got {tuple(t.shape)}")

    # ---- chunked causal forward ----------------------------------------------------------

    def forward_chunk(self, x, t, text_k, text_v, context_k, context_v, context_frames: int):
        """One chunk attending to the cache.

        x: [B, f, C, H, W] noisy (or clean, at t=0) latents of the chunk.
        t: [B, f] timesteps per frame (0..1000).
        text_k, text_v: [num_layers, B, text_len, N, D] from ``text_kv``.
        context_k, context_v: [num_layers, B, M*T, N, D] cached keys/values before RoPE, in cache
            order (sink frames, then window frames oldest first); only the first
            ``context_frames`` frames are valid, the rest is ignored.
        Returns (flow_pred [B, f, C, H, W], k, v [num_layers, B, f*T, N, D]): the prediction
        v = eps - x0 and this chunk's keys/values (before RoPE) for the cache.
        """
        self._check_latents(x, t)
        f, hh, ww = x.shape[1], x.shape[3], x.shape[4]
        grid = self.grid((hh, ww))
        m = context_k.shape[2] // (grid[0] * grid[1])
        # Keys take positions 0..M-1 by cache slot; the chunk's queries and keys follow the valid context.
        tables = {
            k: torch.from_numpy(v).to(x.device)
            for k, v in chunk_tables(m, f, context_frames, grid, self.config.head_dim).items()
        }
        return self.forward_chunk_tables(
            x,
            t,
            text_k,
            text_v,
            context_k,
            context_v,
            tables["key_mask"] > 0.5,
            tables["cos_ctx"],
            tables["sin_ctx"],
            tables["cos_q"],
            tables["sin_q"],
        )

    def forward_chunk_tables(
        self,
        x,
        t,
        text_k,
        text_v,
        context_k,
        context_v,
        key_mask,
        cos_ctx,
        sin_ctx,
        cos_q,
        sin_q,
        time_emb=None,
    ):
        """``forward_chunk`` with positions and validity given as tensors (the exported graph).

        key_mask: [M*T + f*T] bool, True where a key is valid (the chunk's own keys always are).
        cos_ctx/sin_ctx: [M*T, D] RoPE tables of the context slots; cos_q/sin_q: [f*T, D] of the chunk.
        key_mask [B, K] and cos_q/sin_q [B, f*T, D] give each row of x its own cache state.
        time_emb: (e, e0) computed elsewhere (the exported graph takes the host's float64 sinusoid);
            t is ignored when it is given.
        """
        b, f, _, hh, ww = x.shape
        tokens = self.embed(x)
        e, e0 = self.time_embeddings(t) if time_emb is None else time_emb
        # [K]: one mask for every row; [B, K]: one per row (a batched graph's rows in different cache states)
        mask = key_mask.view(1, 1, 1, -1) if key_mask.ndim == 1 else key_mask[:, None, None, :]
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            ctx_k = apply_rope(context_k[i], cos_ctx, sin_ctx)

            def self_attention(q, k, v, ctx_k=ctx_k, ctx_v=context_v[i]):
                new_k.append(k)
                new_v.append(v)
                keys = torch.cat([ctx_k, apply_rope(k, cos_q, sin_q)], dim=1)
                values = torch.cat([ctx_v, v], dim=1)
                return attention(apply_rope(q, cos_q, sin_q), keys, values, mask)

            tokens, _, _ = blk(tokens, e0, text_k[i], text_v[i], self_attention)
        flow = self.unpatchify(self.head(tokens, e), f, (hh, ww))
        return flow, torch.stack(new_k), torch.stack(new_v)

    # ---- full bidirectional forward ------------------------------------------------------

    def forward_full(self, x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Whole clip, every token attending to every token (Wan2.1's WanModel forward).

        x [B, F, C, H, W], t [B, F] (or [B], broadcast over frames), text_embeds [B, L, text_dim]
        -> flow prediction [B, F, C, H, W].
        """
        if t.ndim == 1:
            t = t[:, None].expand(x.shape[0], x.shape[1])
        self._check_latents(x, t)
        b, f, _, hh, ww = x.shape
        h, w = self.grid((hh, ww))
        tokens = self.embed(x)
        e, e0 = self.time_embeddings(t)
        text_k, text_v = self.text_kv(text_embeds)
        cos, sin = (r.to(x.device) for r in rope_tables(torch.arange(f), (h, w), self.config.head_dim))

        def self_attention(q, k, v):
            return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

        for i, blk in enumerate(self.blocks):
            tokens, _, _ = blk(tokens, e0, text_k[i], text_v[i], self_attention)
        return self.unpatchify(self.head(tokens, e), f, (hh, ww))


# --------------------------------------------------------------------------------------------
# Checkpoint keys
# --------------------------------------------------------------------------------------------

_NESTED = ("generator_ema", "generator", "model", "state_dict")


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` or ``.pt``/``.pth`` file (the latter with ``weights_only=True``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint {path} is a directory: pass the weights file in it (.safetensors or "
            ".pt), or give the directory as the model directory (--model-dir)"
        )
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and safetensors errors come in many types
        # one line, and not torch's multi-paragraph advice to load the file unsafely (not the fix here)
        lines = str(exc).strip().splitlines()
        reason = lines[0] if path.endswith(".safetensors") and lines else f"torch.load: {type(exc).__name__}"
        raise CheckpointError(
            f"could not read checkpoint {path} ({reason}): pass a .safetensors or "
            ".pt/.pth state dict (a Reward Forcing or rf-train checkpoint)"
        ) from exc
    require_finite(
        _flat_tensors(state),
        f"checkpoint {path}",
        CheckpointError,
        "weights must be finite; the file is damaged or the training run diverged: use an earlier checkpoint",
    )
    return state


def _flat_tensors(state, prefix: str = "") -> dict:
    """{dotted key: tensor} of a (nested) state dict; other values are skipped."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flat_tensors(v, f"{prefix}{k}."))
    elif isinstance(state, torch.Tensor):
        out[prefix[:-1]] = state
    return out


def normalize_state_dict(state_dict: dict, *, use_ema: bool = True) -> dict:
    """Strip the wrappers release checkpoints put around the model keys.

    - ``{"generator_ema": {...}, "generator": {...}}`` training checkpoints: pick one (EMA by default);
    - ``generator.`` / ``generator_ema.`` / ``model.`` key prefixes;
    - ``_fsdp_wrapped_module.`` anywhere in a key.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"a state dict must be a dict of tensors, got {type(state_dict).__name__}")
    order = ("generator_ema", "generator") if use_ema else ("generator", "generator_ema")
    for key in order + ("state_dict",):
        if isinstance(state_dict.get(key), dict):
            return normalize_state_dict(state_dict[key], use_ema=use_ema)
    prefix = "generator_ema." if use_ema else "generator."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_fsdp_wrapped_module.", "")
        for p in ("generator_ema.", "generator.", "model."):
            if key.startswith(p):
                key = key[len(p) :]
        out[key] = value
    return out


def check_state_dict(model: nn.Module, state_dict: dict, what: str):
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} != model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")

        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {show(shapes)}")
        raise CheckpointError(
            f"state dict does not match {what}: "
            + "; ".join(parts)
            + ". Check that the config matches the checkpoint (dim, num_layers, ffn_dim, text_dim, ...)."
        )
