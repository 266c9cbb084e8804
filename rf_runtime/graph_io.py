"""The contract between the exporter and the engine backend: which graphs a bundle holds and the
names of their tensors. ``rf_runtime.export`` writes graphs with these names; the engine backend
(``rf_runtime.backends.engine``) checks a bundle's graphs against them when it loads one, then binds
its buffers by them. Written once, here; numpy-free and torch-free.

Shapes (B = 1, f = chunk frames, T = tokens per frame, M = context frames, L = layers):

- ``text_kv``: text_embeds [1, text_len, text_dim] -> text_k, text_v [L, 1, text_len, N, D]
- ``dit_step``: one denoising step (or the t = context_t cache pass) of a chunk:
  x, eps [1, f, C, H, W]; t_freq [1, f, freq_dim]; sigma, sigma_next [1]; text_k, text_v;
  ctx_k, ctx_v [L, 1, M*T, N, D]; key_mask [(M + f) * T]; cos_ctx, sin_ctx [M*T, D]; cos_q, sin_q [f*T, D]
  -> x0, x_next [1, f, C, H, W]; new_k, new_v [L, 1, f*T, N, D]
- ``cache_update``: ctx_k, ctx_v, new_k, new_v, mix [M, M + f] -> ctx_k_out, ctx_v_out
- ``vae_decode_first``: z [1, C, 1, H, W] -> frames [1, 3, t, H', W'], cache_i_out
- ``vae_decode``: z, cache_i -> frames, cache_i_out
- ``text_encoder`` (umT5 bundles): input_ids, attention_mask [1, text_len] int64 -> text_embeds
"""

from __future__ import annotations

TEXT_KV = "text_kv"
DIT_STEP = "dit_step"
CACHE_UPDATE = "cache_update"
VAE_DECODE_FIRST = "vae_decode_first"
VAE_DECODE = "vae_decode"
TEXT_ENCODER = "text_encoder"  # umT5 bundles only; run once per prompt like text_kv

GRAPHS = (TEXT_KV, DIT_STEP, CACHE_UPDATE, VAE_DECODE_FIRST, VAE_DECODE)
"""The graphs every bundle holds, in the order a chunk runs them."""

BATCHED_GRAPHS = (DIT_STEP, CACHE_UPDATE, VAE_DECODE_FIRST, VAE_DECODE)
"""The per-chunk graphs a bundle may also hold for B > 1 rows (``rf-export onnx --batch-sizes``): the
same tensors with B on the batch axis (axis 1 of ``text_k`` / ``ctx_k`` / ``new_k``, axis 0 elsewhere),
and per-row cache-state tables: ``key_mask`` [B, (M + f) * T], ``cos_q`` / ``sin_q`` [B, f*T, D],
``mix`` [B, M, M + f]. ``t_freq``, ``sigma``, ``sigma_next``, ``cos_ctx``, ``sin_ctx`` stay shared
(the rows of one call are at the same denoising step). The text graphs run once per prompt: batch 1."""


def batched(graph: str, size: int) -> str:
    """The name of a per-chunk graph's batch-``size`` export: ``dit_step`` at 2 is ``dit_step_b2``."""
    return graph if size == 1 else f"{graph}_b{size}"


def unbatched(name: str) -> str:
    """``dit_step_b2`` -> ``dit_step`` (a batched export has its graph's tensor names); others as they are."""
    head, sep, size = name.rpartition("_b")
    return head if sep and size.isdigit() and head in BATCHED_GRAPHS else name


DIT_STEP_INPUTS = (
    "x",
    "eps",
    "t_freq",
    "sigma",
    "sigma_next",
    "text_k",
    "text_v",
    "ctx_k",
    "ctx_v",
    "key_mask",
    "cos_ctx",
    "sin_ctx",
    "cos_q",
    "sin_q",
)
DIT_STEP_OUTPUTS = ("x0", "x_next", "new_k", "new_v")
STATE_TABLES = ("key_mask", "cos_q", "sin_q")  # dit_step inputs that depend on the cache state only
STEP_TABLES = ("t_freq", "sigma", "sigma_next")  # dit_step inputs that depend on the denoising step only
CONTEXT_TABLES = ("cos_ctx", "sin_ctx")  # dit_step inputs that never change
CACHE_UPDATE_INPUTS = ("ctx_k", "ctx_v", "new_k", "new_v", "mix")
CACHE_UPDATE_OUTPUTS = ("ctx_k_out", "ctx_v_out")
TEXT_KV_INPUTS = ("text_embeds",)
TEXT_KV_OUTPUTS = ("text_k", "text_v")
VAE_LATENT = "z"
VAE_FRAMES = "frames"
TEXT_ENCODER_INPUTS = ("input_ids", "attention_mask")
TEXT_ENCODER_OUTPUTS = ("text_embeds",)


def vae_cache_names(n: int) -> tuple[list[str], list[str]]:
    """The VAE decoder's feature-cache tensors: inputs ``cache_i`` and outputs ``cache_i_out``, in slot order."""
    return [f"cache_{i}" for i in range(n)], [updated(f"cache_{i}") for i in range(n)]


def updated(name: str) -> str:
    """The output that carries the new value of a state input (``ctx_k`` -> ``ctx_k_out``)."""
    return f"{name}_out"


def io_names(graph: str, vae_cache_slots: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) a graph of the contract has, in graph order."""
    graph = unbatched(graph)
    ins, outs = vae_cache_names(vae_cache_slots)
    names = {
        TEXT_KV: (TEXT_KV_INPUTS, TEXT_KV_OUTPUTS),
        DIT_STEP: (DIT_STEP_INPUTS, DIT_STEP_OUTPUTS),
        CACHE_UPDATE: (CACHE_UPDATE_INPUTS, CACHE_UPDATE_OUTPUTS),
        VAE_DECODE_FIRST: ((VAE_LATENT,), (VAE_FRAMES, *outs)),
        VAE_DECODE: ((VAE_LATENT, *ins), (VAE_FRAMES, *outs)),
        TEXT_ENCODER: (TEXT_ENCODER_INPUTS, TEXT_ENCODER_OUTPUTS),
    }
    if graph not in names:
        raise KeyError(f"{graph!r} is not a graph of the bundle contract; the graphs are {sorted(names)}")
    return names[graph]


def variant(graph: str, precision: str) -> str:
    """The name of a graph's precision variant: ``dit_step`` at fp16 is ``dit_step@fp16`` (fp32: the plain name)."""
    return graph if precision == "fp32" else f"{graph}@{precision}"


def base_graph(name: str) -> str:
    """``dit_step@fp16`` -> ``dit_step``."""
    return name.partition("@")[0]


def mismatch(graph: str, inputs, outputs, vae_cache_slots: int = 0) -> str | None:
    """Why a graph's IO names differ from the contract, or None when they match (tensors are bound by
    name, so the order does not matter)."""
    want_in, want_out = io_names(graph, vae_cache_slots)
    problems = []
    for kind, want, have in (("inputs", want_in, tuple(inputs)), ("outputs", want_out, tuple(outputs))):
        if sorted(want) != sorted(have):
            problems.append(f"{kind} {list(have)}, the runtime expects {list(want)}")
    return "; ".join(problems) or None
