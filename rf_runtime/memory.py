"""How much memory a stream of a bundle needs, from its manifest alone (no session, no torch), and
whether the device has it: ``rf-bench --estimate BUNDLE``.

For each way the bundle can run (onnxruntime on the fp32 graphs; TensorRT on the graphs of each
precision it holds) the estimate adds up, from the graphs' declared inputs and outputs:

    weights      the graph files and their external data (TensorRT: the plans, where built);
                 shared by every stream of a loaded bundle
    runtime      what the runtime holds beyond the weight bytes (session graphs, packed weights,
                 arena growth at the first chunk): ``RUNTIME_OVERHEAD`` x weights, measured
    activations  the scratch each graph needs while it runs (below); shared too, since every graph
                 keeps its own arena (onnxruntime) or scratch (TensorRT runner) between calls
    kv_cache     the context K/V, two copies (the cache update cannot write its input)
    new_kv       the chunk's K/V written by each denoising step
    text_kv      the cross-attention K/V of the stream's prompt
    vae_cache    the VAE decoder's feature cache, two copies (ping-pong, like the K/V)
    latents      the chunk latents (x, x_next, x0, eps), the ring of clean latents re-cached on a
                 prompt switch, one latent frame's decoded pixels (one buffer per VAE binding and
                 the float32 scratch of the uint8 conversion)

These are the buffers ``rf_runtime.backends.engine.EngineBackend.new_stream`` allocates. The
activations are the largest intermediates of each graph, from the geometry:

    dit_step     self-attention logits [N, f*T, (M+f)*T] in float32 (the softmax is float32 in
                 every variant), three of them alive at once (scores, masked scores, softmax) plus
                 their cast back in a low-precision graph; the layer's keys and values over the
                 context and the chunk; the FFN hidden [f*T, ffn] twice; the residual stream
    cache_update the context and the chunk concatenated, K and V, in float32, twice (the
                 concatenation and the frame-mixing Einsum's own copy)
    vae          four of the largest feature-cache slot (a convolution's input with its cached
                 frames and its output, at full resolution)
    text_kv      the text embeddings and one layer's projections (small)

They bound what onnxruntime's CPU arena keeps; TensorRT fuses attention and usually needs less.
The comparison with measured streams is in docs/notes/export.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rf_runtime.errors import RFError
from rf_runtime.graph_io import (
    CACHE_UPDATE,
    DIT_STEP,
    GRAPHS,
    TEXT_KV,
    VAE_DECODE,
    VAE_DECODE_FIRST,
    VAE_LATENT,
)

GIB, MIB = 1 << 30, 1 << 20
PARTS = ("weights", "runtime", "activations", "kv_cache", "new_kv", "text_kv", "vae_cache", "latents")
SHARED = ("weights", "runtime", "activations")  # per loaded bundle; the other parts are per stream
# What onnxruntime's CPU sessions hold beyond the weight bytes, as a share of them: measured on the
# 1.3B geometry's bundle at 64 x 112 (docs/notes/export.md, "Export at real scale"): loading added
# 6888 MiB for 6033 MiB of weights, the first chunk 1731 MiB more (flat after it), against 693 MiB
# of stream buffers and activations estimated: (6888 + 1731 - 6033 - 693) / 6033 = 0.31. TensorRT: not
# measured (no GPU here), 0.
RUNTIME_OVERHEAD = {"onnxruntime": 0.31, "tensorrt": 0.0}
HEADROOM = 0.9  # above this share of the device's free memory the estimate warns


@dataclass(frozen=True)
class Estimate:
    backend: str  # "onnxruntime" or "tensorrt"
    precision: str  # of the graphs it runs
    parts: dict[str, int] = field(default_factory=dict)  # bytes, PARTS
    streams: int = 1

    @property
    def per_stream(self) -> int:
        return sum(v for k, v in self.parts.items() if k not in SHARED)

    @property
    def total(self) -> int:
        return sum(self.parts[k] for k in SHARED) + self.streams * self.per_stream


def _nbytes(tensor) -> int:
    return tensor.nbytes


def _vae_slots(spec) -> list:
    """The VAE step's feature-cache inputs (every input but the latent frame)."""
    return [t for t in spec.inputs if t.name != VAE_LATENT]


def _graph_names(graphs: dict, precision: str) -> dict[str, str] | None:
    """Runtime graph -> manifest graph name for ``precision``; None when the bundle lacks one."""
    names = {g: g if precision == "fp32" else f"{g}@{precision}" for g in GRAPHS}
    return names if all(n in graphs for n in names.values()) else None


def activation_bytes(dit: dict, stream: dict, graphs: dict) -> dict[str, int]:
    """The activations of each runtime graph (``graphs``: runtime name -> GraphSpec), see the module
    docstring. ``dit``: the manifest's DiT config; ``stream``: its stream settings."""
    step = graphs[DIT_STEP].tensors
    c = stream["chunk_frames"]
    m = stream["sink_frames"] + stream["window_frames"] - c
    layers, ctx_tokens, heads, head_dim = step["ctx_k"].shape[0], *step["ctx_k"].shape[2:]
    t = ctx_tokens // m  # tokens per latent frame
    q, k, width = c * t, (m + c) * t, heads * head_dim
    act = _nbytes(step["ctx_k"]) // max(1, layers * ctx_tokens * width)  # bytes per element of the K/V
    logits = heads * q * k
    dit_step = 3 * 4 * logits + (act * logits if act != 4 else 0)
    dit_step += 2 * k * width * act + 2 * q * dit["ffn_dim"] * act + 6 * q * width * 4
    concat = layers * k * width * 4  # one of K / V over context + chunk, float32
    cache_update = 2 * 2 * concat
    slots = _vae_slots(graphs[VAE_DECODE])
    vae = 4 * max((_nbytes(s) for s in slots), default=0)
    text = graphs[TEXT_KV].tensors["text_embeds"]
    text_kv = 2 * _nbytes(text) + 2 * dit["text_len"] * width * 4
    return {DIT_STEP: dit_step, CACHE_UPDATE: cache_update, "vae": vae, TEXT_KV: text_kv}


def estimate(bundle, backend: str, precision: str, streams: int = 1) -> Estimate | None:
    """The memory of ``streams`` streams of ``bundle`` (a ``rf_runtime.bundle.Bundle``) on ``backend``
    with the graphs of ``precision``; None when the bundle has no such graphs."""
    names = _graph_names(bundle.graphs, precision)
    if names is None:
        return None
    m = bundle.manifest
    files = m["files"]
    graphs = {g: bundle.graphs[n] for g, n in names.items()}
    plans = bundle.plans

    def weight_bytes(name: str) -> int:
        if backend == "tensorrt" and name in plans:
            return files[plans[name]["file"]]["bytes"]
        entry = m["graphs"][name]
        keys = [entry["file"], *entry.get("external_data", ())]
        return sum(files[key]["bytes"] for key in keys)

    used = list(names.values())
    if m.get("text_encoder", {}).get("kind") == "umt5":
        used.append(m["text_encoder"]["graph"])  # fp32 only; once per prompt, but loaded all along
    step, vae = graphs[DIT_STEP].tensors, graphs[VAE_DECODE].tensors
    x = _nbytes(step["x"])
    context_chunks = (m["stream"]["sink_frames"] + m["stream"]["window_frames"]) // m["stream"][
        "chunk_frames"
    ] - 1
    parts = {
        "weights": sum(weight_bytes(n) for n in used),
        "runtime": 0,
        "activations": sum(activation_bytes(m["model"]["dit"], m["stream"], graphs).values()),
        "kv_cache": 2 * (_nbytes(step["ctx_k"]) + _nbytes(step["ctx_v"])),
        "new_kv": _nbytes(step["new_k"]) + _nbytes(step["new_v"]),
        "text_kv": _nbytes(step["text_k"]) + _nbytes(step["text_v"]),
        "vae_cache": 2 * sum(_nbytes(v) for v in _vae_slots(graphs[VAE_DECODE])),
        # x ping-pong, x0, eps, the ring; frames: one per VAE binding (first, two steps) + the scratch
        "latents": (4 + context_chunks) * x
        + 3 * _nbytes(vae["frames"])
        + _nbytes(graphs[VAE_DECODE_FIRST].tensors["frames"]),
    }
    parts["runtime"] = int(RUNTIME_OVERHEAD[backend] * parts["weights"])
    return Estimate(backend, precision, parts, streams)


def estimates(bundle, device: str, streams: int = 1) -> list[Estimate]:
    """Every way the bundle runs on ``device``: onnxruntime on the fp32 graphs (the engine backend's
    onnxruntime runners read those), and on CUDA also TensorRT on each precision the bundle holds."""
    rows = [estimate(bundle, "onnxruntime", "fp32", streams)]
    if device == "cuda":
        rows += [estimate(bundle, "tensorrt", p, streams) for p in ("fp32", "fp16", "bf16")]
    return [r for r in rows if r is not None]


def device_memory(device: str) -> tuple[int, str]:
    """(free bytes, where the number comes from) of ``device``: CPU from psutil or /proc/meminfo
    (MemAvailable), CUDA from cuda-python's cudaMemGetInfo. Raises RFError when it cannot be read
    (pass --device-memory then). torch is never imported."""
    if device == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available), "psutil available"
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
        except OSError:
            pass
        raise RFError(
            "cannot read this machine's free memory (no psutil, no /proc/meminfo): pass --device-memory GIB"
        )
    if device.startswith("cuda"):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise RFError(
                "cannot read the GPU's free memory without cuda-python (pip install 'rf_runtime[gpu]'): "
                "pass --device-memory GIB (the free memory nvidia-smi shows)"
            ) from None
        index = int(device.partition(":")[2] or 0)
        err, *_ = cudart.cudaSetDevice(index)
        if int(err) == 0:
            err, free, _total = cudart.cudaMemGetInfo()
        if int(err) != 0:
            raise RFError(f"cudaMemGetInfo on {device} failed ({err}): pass --device-memory GIB")
        return int(free), f"cudaMemGetInfo on {device}"
    raise RFError(f"unknown device {device!r}: use cpu or cuda[:N]")


def size(n: int) -> str:
    """Bytes for a message: GiB from 1 GiB on, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def verdict(row: Estimate, free: int) -> str:
    if row.total > free:
        return "DOES NOT FIT"
    return "tight" if row.total > HEADROOM * free else "fits"


def format_estimates(rows: list[Estimate], free: int, source: str) -> str:
    head = (
        "backend",
        "precision",
        *PARTS,
        f"total ({rows[0].streams} stream{'s' * (rows[0].streams > 1)})",
        "verdict",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r.backend,
                r.precision,
                *(f"{r.parts[p] / MIB:.1f}" for p in PARTS),
                f"{r.total / MIB:.1f}",
                verdict(r, free),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(
        f"MiB; device free memory {free / MIB:.1f} MiB ({source}); weights and activations are shared by all "
        "streams, the other parts are per stream"
    )
    return "\n".join(out)


def check(rows: list[Estimate], free: int, bundle_path: str) -> str | None:
    """None when the best way fits; else the message of the error a load would end in."""
    best = min(rows, key=lambda r: r.total)
    if best.total <= free:
        return None
    return (
        f"{bundle_path} needs {size(best.total)} for {best.streams} stream(s) even on its smallest "
        f"way to run ({best.backend} {best.precision}), and the device has {size(free)} free: "
        "use fewer streams, a low-precision TensorRT build (rf-export onnx --precision fp32,fp16, then "
        "rf-export trt), or export at a smaller resolution"
    )


def read_bundle(path: str | os.PathLike):
    """The bundle at ``path``, its structure and file sizes checked, not its hashes: fast at any size,
    and nothing is loaded (no session, no plan)."""
    from rf_runtime.bundle import Bundle

    return Bundle.load(path, verify_hashes=False)
