"""``rf-bench --profile``: where a chunk's time goes, against what the machine can do.

Three measurements, each named:

- ``graph_flops(path)``: the arithmetic of one call of an ONNX graph, counted from its static
  shapes (onnx shape inference): 2 x multiply-adds of every ``MatMul``, ``Gemm``, ``Conv``,
  ``ConvTranspose`` and ``Einsum``. Element-wise ops, norms and softmax are not counted (they are
  memory-bound and a few percent of the arithmetic), so the achieved rates are lower bounds.
- ``sgemm_peak()``: this machine's float32 matrix-multiply rate on one core, measured now with
  onnxruntime's own kernel (MLAS, a 1024^3 ``MatMul`` on one intra-op thread), best of a few runs.
- ``GraphTimer``: the wall time of every ``Runner.run`` of a backend's graphs, per graph, and the
  CPU time of the calling thread (all of a one-thread session's work: it runs the graph on the caller).

On a shared machine wall time moves with the other load; the CPU-time rates (``cpu_gflops``,
``share_of_peak_cpu``: a one-thread session against the peak measured the same way) move much less.

``profile_report`` combines them with the chunk wall time: per graph the calls and milliseconds
per chunk, MFLOP per call, achieved GFLOP/s and its share of the peak of the cores that graph's
session may use, and the host-side share of the chunk (the wall time outside every graph run:
Python, noise drawing, buffer rebinding, the uint8 conversion).
"""

from __future__ import annotations

import time

import numpy as np

from rf_runtime.errors import InputError, require

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def _shapes(model) -> dict[str, tuple[int, ...]]:
    onnx = require("onnx", "export")
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {}
    for v in (*g.input, *g.output, *g.value_info):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(int(d.dim_value) for d in dims)
        elif v.type.tensor_type.HasField("shape") and not dims:
            shapes[v.name] = ()
    for t in g.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in a.t.dims)
    return shapes


def _einsum_flops(equation: str, operand_shapes) -> int:
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, shape in zip(lhs, operand_shapes):
        if "..." in letters or len(letters) != len(shape):
            raise ValueError(f"einsum {equation} with shapes {operand_shapes}")
        for c, n in zip(letters, shape):
            sizes[c] = n
    return 2 * int(np.prod(list(sizes.values()), dtype=np.int64))


def node_flops(node, shapes) -> int | None:
    """2 x multiply-adds of one node; None when its shapes are unknown (counted as uncounted)."""

    def shape(name):
        return shapes.get(name)

    attrs = {a.name: a for a in node.attribute}
    op = node.op_type
    if op == "MatMul":
        a, out = shape(node.input[0]), shape(node.output[0])
        if a is None or out is None:
            return None
        return 2 * int(np.prod(out, dtype=np.int64)) * a[-1]
    if op == "Gemm":
        a, out = shape(node.input[0]), shape(node.output[0])
        if a is None or out is None:
            return None
        k = a[0] if "transA" in attrs and attrs["transA"].i else a[1]
        return 2 * int(np.prod(out, dtype=np.int64)) * k
    if op in ("Conv", "ConvTranspose"):
        x, w, out = shape(node.input[0]), shape(node.input[1]), shape(node.output[0])
        if x is None or w is None or out is None:
            return None
        # Conv weight [O, C/g, k...]: each output element is C/g * prod(k) multiply-adds;
        # ConvTranspose weight [C, O/g, k...]: each input element scatters into O/g * prod(k).
        if op == "Conv":
            return 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        return 2 * int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "Einsum":
        operands = [shape(n) for n in node.input]
        if any(s is None for s in operands):
            return None
        if len(operands) == 1:  # a permutation or a reduction: no multiply-adds
            return 0
        return _einsum_flops(attrs["equation"].s.decode(), operands)
    return 0


def basic_optimized(path):
    """The graph as onnxruntime holds it after its basic (hardware-independent) optimisations: shape
    arithmetic folded, so every tensor has a static shape that onnx shape inference can give."""
    import os
    import tempfile

    onnx = require("onnx", "export")
    ort = require("onnxruntime", "cpu")
    with tempfile.TemporaryDirectory(prefix="rf-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def graph_flops(path) -> dict:
    """{"flops": per call, "by_op": {op: flops}, "nodes": node count (as onnxruntime loads it, after
    its basic optimisations), "uncounted": nodes of counted kinds whose shapes are unknown (0 for
    the bundles rf-export writes)}."""
    model = basic_optimized(path)
    shapes = _shapes(model)
    by_op, uncounted = {}, 0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        f = node_flops(node, shapes)
        if f is None:
            uncounted += 1
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    return {
        "flops": int(sum(by_op.values())),
        "by_op": by_op,
        "nodes": len(model.graph.node),
        "uncounted": uncounted,
    }


def sgemm_peak(n: int = 1024, repeats: int = 7) -> dict:
    """Float32 GEMM rate of ONE core, now: onnxruntime's MatMul (MLAS) on [n, n] x [n, n], one intra-op
    thread, no spinning; the best of ``repeats`` runs (the least disturbed by other load)."""
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "cpu")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "a": rng.standard_normal((n, n), dtype=np.float32),
        "b": rng.standard_normal((n, n), dtype=np.float32),
    }
    session.run(None, feed)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        session.run(None, feed)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.thread_time() - cpu)
    del onnx
    flop = 2 * n**3
    return {
        "n": n,
        "seconds": best,
        "gflops_per_core": flop / best / 1e9,
        "cpu_seconds": best_cpu,
        "gflops_per_core_cpu": flop / max(best_cpu, 1e-9) / 1e9,
        "kernel": "onnxruntime MLAS MatMul",
    }


class GraphTimer:
    """Times every ``run`` of the given runners (per graph name): wraps each runner's ``run`` method
    on the instance, so the backend's code is unchanged. ``stop()`` restores them."""

    def __init__(self, runners: dict):
        self.runners = runners
        self.seconds = {name: 0.0 for name in runners}
        self.cpu = {name: 0.0 for name in runners}
        self.calls = {name: 0 for name in runners}
        for name, runner in runners.items():
            runner.run = self._timed(name, runner.run)

    def _timed(self, name, run):
        def timed(binding):
            start, cpu = time.perf_counter(), time.thread_time()
            run(binding)
            self.seconds[name] += time.perf_counter() - start
            self.cpu[name] += time.thread_time() - cpu
            self.calls[name] += 1

        return timed

    def snapshot(self) -> tuple[dict, dict, dict]:
        return dict(self.seconds), dict(self.calls), dict(self.cpu)

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.__dict__.pop("run", None)


def profile_report(
    graphs: dict,
    *,
    chunks: int,
    chunk_seconds: float,
    seconds: dict,
    calls: dict,
    threads: dict,
    peak_per_core: float,
    cpu: dict | None = None,
    peak_per_core_cpu: float | None = None,
) -> dict:
    """The profile of ``chunks`` timed chunks.

    graphs: {graph: graph_flops(...)}; seconds / calls: summed over those chunks, per graph;
    threads: intra-op threads of each graph's session (the cores its peak counts);
    peak_per_core: GFLOP/s of one core (sgemm_peak); cpu / peak_per_core_cpu: the same by the calling
    thread's CPU time (reported for one-thread sessions only: others work on other threads too)."""
    if chunks < 1:
        raise InputError("profile needs at least one timed chunk")
    rows, in_graphs, flops_chunk = {}, 0.0, 0.0
    for name, g in graphs.items():
        n = calls.get(name, 0) / chunks
        s = seconds.get(name, 0.0) / chunks
        in_graphs += s
        flops_chunk += g["flops"] * n
        rate = g["flops"] * n / s / 1e9 if s > 0 else 0.0
        cores = threads.get(name) or 1
        c = (cpu or {}).get(name, 0.0) / chunks
        cpu_rate = g["flops"] * n / c / 1e9 if c > 0 and cores == 1 else None
        cpu_share = cpu_rate / peak_per_core_cpu if cpu_rate is not None and peak_per_core_cpu else None
        rows[name] = {
            "cpu_ms_per_chunk": c * 1e3,
            "cpu_gflops": cpu_rate,
            "share_of_peak_cpu": cpu_share,
            "calls_per_chunk": n,
            "ms_per_chunk": s * 1e3,
            "ms_per_call": s / n * 1e3 if n else 0.0,
            "mflop_per_call": g["flops"] / 1e6,
            "nodes": g["nodes"],
            "gflops": rate,
            "threads": cores,
            "share_of_peak": rate / (peak_per_core * cores) if peak_per_core > 0 else 0.0,
            "uncounted_nodes": g["uncounted"],
        }
    return {
        "graphs": rows,
        "chunk_ms": chunk_seconds / chunks * 1e3,
        "graphs_ms": in_graphs * 1e3,
        "host_ms": max(chunk_seconds / chunks - in_graphs, 0.0) * 1e3,
        "host_share": max(1.0 - in_graphs / (chunk_seconds / chunks), 0.0),
        "gflop_per_chunk": flops_chunk / 1e9,
        "peak_gflops_per_core": peak_per_core,
        "peak_gflops_per_core_cpu": peak_per_core_cpu,
        "counted_ops": list(COUNTED_OPS),
    }


def format_profile(profile: dict) -> str:
    lines = [
        f"{'graph':<18}{'calls/chunk':>12}{'ms/chunk':>10}{'ms/call':>9}{'MFLOP/call':>12}{'nodes':>7}"
        f"{'GFLOP/s':>9}{'threads':>8}{'% peak':>8}{'% peak (CPU time)':>19}"
    ]
    for name, r in profile["graphs"].items():
        by_cpu = r.get("share_of_peak_cpu")
        lines.append(
            f"{name:<18}{r['calls_per_chunk']:>12.2f}{r['ms_per_chunk']:>10.2f}{r['ms_per_call']:>9.2f}"
            f"{r['mflop_per_call']:>12.1f}{r['nodes']:>7}{r['gflops']:>9.1f}{r['threads']:>8}"
            f"{100 * r['share_of_peak']:>7.1f}%"
            + (f"{100 * by_cpu:>18.1f}%" if by_cpu is not None else f"{'-':>19}")
        )
    lines.append(
        f"chunk {profile['chunk_ms']:.2f} ms = graphs {profile['graphs_ms']:.2f} ms + host "
        f"{profile['host_ms']:.2f} ms ({100 * profile['host_share']:.1f}% host); "
        f"{profile['gflop_per_chunk']:.3f} GFLOP per chunk; sgemm peak "
        f"{profile['peak_gflops_per_core']:.1f} GFLOP/s per core (onnxruntime MLAS, measured now)"
    )
    return "\n".join(lines)
