"""A world DiT at twice the width that computes the same function (Net2Net's "wider" operator, for
the Wan blocks), so a larger teacher continues from a trained one instead of starting over.

Every vector of width ``dim`` (the residual stream, the attention's q / k / v, the time and text
embeddings, the modulation) and of width ``ffn_dim`` becomes the vector written twice, ``[x, x]``:

- a weight that *writes* such a vector has its output rows written twice;
- a weight that *reads* one has its input columns split into ``W / 2 + N`` and ``W / 2 - N`` (N a small
  random matrix), so ``W' [x, x] = W x`` exactly while the two copies of each unit get different
  outgoing weights, and so different gradients: training pulls them apart;
- LayerNorm and RMSNorm over ``[x, x]`` see the same mean and variance as over ``x``; the heads double
  (head_dim and so the 3D RoPE stay the same), and duplicated heads attend alike.

The widened model's output equals the original's to float rounding (``tests/test_world_widen.py``).

``rechannel_dit`` is the other resize a trained DiT takes when its VAE changes: latents of another
number of channels. Only the patch embedding (reads the latent) and the output head's projection
(writes it) depend on the channels; they start fresh, and every other weight (the blocks, the text and
time embeddings, the head's modulation) is kept, so the new teacher keeps what the old one learned
about text, time and attention and relearns only the latent code.
"""

from __future__ import annotations

import dataclasses

import torch

from rf_runtime.errors import ConfigError
from rf_runtime.models import CausalDiT

# parameters that *read* a widened vector (their last axis), by name suffix. Every parameter but the
# output head writes one along its first axis (time_projection: six of them; a modulation: its last).
_READS = (
    ".q.weight",
    ".k.weight",
    ".v.weight",
    ".o.weight",
    ".ffn.0.weight",
    ".ffn.2.weight",
    "text_embedding.2.weight",
    "time_embedding.2.weight",
    "time_projection.1.weight",
    "head.head.weight",
)


def widened_config(config):
    """The DiT config at twice the width: dim, ffn_dim and the number of heads doubled."""
    return dataclasses.replace(
        config, dim=2 * config.dim, ffn_dim=2 * config.ffn_dim, num_heads=2 * config.num_heads
    )


def _write_twice(t: torch.Tensor, axis: int, blocks: int) -> torch.Tensor:
    """Write each of ``blocks`` equal parts of ``axis`` twice: [a, b] -> [a, a, b, b] for blocks = 2."""
    shape = list(t.shape)
    parts = t.reshape(*shape[:axis], blocks, shape[axis] // blocks, *shape[axis + 1 :])
    both = torch.cat([parts, parts], dim=axis + 1)
    shape[axis] *= 2
    return both.reshape(shape)


def _read_split(t: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    """Columns [W/2 + N, W/2 - N] for an input written twice; N ~ noise * std(W) * normal."""
    n = torch.randn(t.shape, generator=gen, dtype=t.dtype) * (noise * float(t.std()))
    return torch.cat([t / 2 + n, t / 2 - n], dim=-1)


def widen_dit(model: CausalDiT, *, noise: float = 0.05, seed: int = 0) -> CausalDiT:
    """``model`` at twice the width, the same function (see the module's docstring)."""
    cfg = model.config
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name.endswith("modulation"):  # [1, k, dim]: k vectors of width dim
            t = _write_twice(t, t.dim() - 1, 1)
        elif not name.startswith("head.head"):  # the output rows (or the bias) of a widened vector
            t = _write_twice(t, 0, 6 if name.startswith("time_projection") else 1)
        if name.endswith(_READS):
            t = _read_split(t, gen, noise)
        state[name] = t
    wide = CausalDiT(widened_config(cfg))
    expected = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:  # a parameter this operator does not know (a new layer kind)
        bad = sorted(k for k in expected if expected[k] != got.get(k))
        raise ConfigError(f"cannot widen this DiT: no rule for {', '.join(bad[:4])}")
    wide.load_state_dict(state)
    return wide.train(model.training)


# the parameters whose shape follows the latent channels: fresh in ``rechannel_dit``
_LATENT_IO = ("patch_embedding.", "head.head.")


def rechannel_dit(model: CausalDiT, z_dim: int, *, seed: int = 0) -> CausalDiT:
    """``model`` for latents of ``z_dim`` channels: a fresh (seeded) patch embedding and output
    projection, every other weight kept (see the module's docstring)."""
    if not z_dim >= 1:
        raise ConfigError(f"z_dim must be >= 1, got {z_dim}")
    torch.manual_seed(seed)
    new = CausalDiT(dataclasses.replace(model.config, in_dim=z_dim, out_dim=z_dim))
    state = new.state_dict()
    for name, t in model.state_dict().items():
        if not name.startswith(_LATENT_IO):
            state[name] = t.detach().clone()
    new.load_state_dict(state)
    return new.train(model.training)
