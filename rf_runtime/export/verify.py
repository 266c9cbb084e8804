"""``rf-export verify``: every graph of a bundle, on every available backend, against PyTorch.

For each graph (fp32 and its low-precision variants) one set of random, well-formed inputs is
drawn (a valid key mask and real RoPE tables for the DiT step, a real commit matrix for the cache
update, token ids with a padding tail for umT5), rounded to the graph's input types, and run both
through the backend and through the PyTorch fp32 reference module the graph was exported from
(loaded from the model directory). A row reports the worst output: max abs error, relative error
``||got - ref|| / ||ref||``, the tolerance of the graph's precision, and PASS / FAIL / SKIP.

Backends: ``onnxruntime-cpu`` (always), ``onnxruntime-cuda`` (when onnxruntime-gpu sees a GPU),
``tensorrt`` (the bundle's plans, when TensorRT and a GPU are present) and ``onnx-reference``
(onnx's numpy evaluator: slow, but it runs bf16 graphs, which onnxruntime's CPU provider cannot;
asked for explicitly with ``backends=``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import ConfigError, InputError, MissingDependencyError
from rf_runtime.graph_io import unbatched

# Relative error allowed per graph precision (fp16 has 11 significant bits, bf16 8).
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "onnx-reference")


@dataclass(frozen=True)
class VerifyRow:
    graph: str
    precision: str
    backend: str
    max_abs: float
    rel: float
    tol: float
    status: str  # PASS, FAIL or SKIP
    note: str = ""


def split_name(graph: str) -> tuple[str, str]:
    """'dit_step@fp16' -> ('dit_step', 'fp16'); 'dit_step' -> ('dit_step', 'fp32')."""
    base, _, precision = graph.partition("@")
    return base, precision or "fp32"


def graph_io(spec):
    """[(name, shape, numpy dtype)] of the inputs and of the outputs of a ``GraphSpec`` (a manifest
    ``graphs`` entry, checked against its .onnx by ``Bundle.load``); bfloat16 via ml_dtypes."""
    import ml_dtypes

    from rf_runtime.runners.base import DTYPES

    dtypes = {**DTYPES, "bfloat16": ml_dtypes.bfloat16}
    return tuple([(t.name, t.shape, dtypes[t.dtype]) for t in ts] for ts in (spec.inputs, spec.outputs))


class References:
    """The PyTorch fp32 reference module of every graph kind, and well-formed random inputs for it."""

    def __init__(self, model_dir, checkpoint=None):
        from rf_runtime.backends.pytorch import TorchBackend

        self.backend = TorchBackend.from_dir(model_dir, checkpoint)

    def module(self, base: str):
        from rf_runtime.export.dit_graph import CacheUpdate, DiTStep, TextKV
        from rf_runtime.export.vae_graph import DecodeFirst, DecodeNext

        b = self.backend
        if base == "dit_step":
            return DiTStep(b.dit)
        if base == "text_kv":
            return TextKV(b.dit)
        if base == "cache_update":
            h, w = b.dit.grid(b.info.latent_hw)
            return CacheUpdate(h * w)
        if base == "vae_decode_first":  # the reference decoder (the graph holds its lowered form)
            return DecodeFirst(b.vae.decode_step)
        if base == "vae_decode":
            return DecodeNext(b.vae.decode_step)
        if base == "text_encoder":
            from rf_runtime.export.text_graph import TextEncoderGraph

            return TextEncoderGraph(b.text_encoder.model)
        raise ConfigError(
            f"no PyTorch reference for graph {base!r}: known graphs are dit_step, text_kv, cache_update, "
            "vae_decode_first, vae_decode, text_encoder"
        )

    def inputs(self, base: str, inputs, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random well-formed float32 / int64 inputs of graph ``base`` for the declared ``inputs``."""
        from rf_runtime.cache import commit_matrix

        b = self.backend
        spec = b.info.settings.cache_spec
        if base == "dit_step":
            from rf_runtime.export.dit_graph import example_inputs

            valid = int(rng.choice(sorted({spec.valid_frames(n) for n in range(spec.window_slots + 3)})))
            return example_inputs(
                b.dit,
                b.info.latent_hw,
                spec.context_frames,
                spec.chunk_frames,
                valid,
                seed=int(rng.integers(1 << 31)),
            )
        if base == "text_encoder":
            shape = inputs[0][1]
            vocab = b.text_encoder.model.config.vocab_size
            length = int(rng.integers(1, shape[1] + 1))
            ids = np.zeros(shape, np.int64)
            ids[:, :length] = rng.integers(2, vocab, (shape[0], length))
            mask = (np.arange(shape[1]) < length).astype(np.int64)[None].repeat(shape[0], 0)
            return {"input_ids": ids, "attention_mask": mask}
        feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in inputs}
        if base == "cache_update":  # a state where the window is full: write, evict and fold at once
            feeds["mix"] = commit_matrix(spec, spec.window_slots + 1).astype(np.float32)
        return feeds


def _check_same_model(manifest: dict, backend, bundle_dir: str, model_dir) -> None:
    """The reference must have the bundle's geometry, or there is nothing to compare."""
    model = manifest.get("model", {})
    ours = {"dit": backend.dit.config.to_dict(), "latent_hw": list(backend.info.latent_hw)}
    for key, value in ours.items():
        if key in model and model[key] != value:
            raise InputError(
                f"{bundle_dir} was exported from another model: its {key} is {model[key]}, the model in "
                f"{os.fspath(model_dir)} has {value}; pass the --model-dir (and --checkpoint) it was "
                "exported from"
            )


def run_reference(module, names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module.eval()(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def available_backends() -> list[str]:
    """The backends this machine can run (without importing TensorRT when it is absent)."""
    import importlib.util

    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        found.append("onnxruntime-cpu")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("onnxruntime-cuda")
    if importlib.util.find_spec("tensorrt") is not None:
        found.append("tensorrt")
    return found


def _run_backend(backend: str, path: str, spec, feeds: dict, out_names, plan: str | None):
    if backend in ("onnxruntime-cpu", "onnxruntime-cuda"):
        from rf_runtime.runners import OnnxRuntimeRunner

        with OnnxRuntimeRunner(path, spec, device=backend.partition("-")[2]) as runner:
            out = runner.infer(feeds)
            return [out[n].copy() for n in out_names]
    if backend == "onnx-reference":
        import onnx
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(onnx.load(path)).run(out_names, feeds)
    if backend == "tensorrt":
        # the runtime's own TensorRT runner (what streams run): copies and the run on one CUDA stream;
        # bf16 inputs are written as their bits, bf16 outputs read back as float32 (exact)
        from rf_runtime.runners import TensorRTRunner

        with TensorRTRunner(plan, spec) as runner:
            b = runner.bind()
            for name in spec.input_names():
                runner.write(b[name], feeds[name])
            runner.run(b)
            return [np.array(runner.read(b[n]), np.float32) for n in out_names]
    raise ConfigError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")


def verify_bundle(
    bundle_dir, model_dir, checkpoint=None, *, backends=None, seed: int = 0, graphs=None
) -> list[VerifyRow]:
    """Run every graph of the bundle on each backend against the PyTorch reference; return the rows."""
    from rf_runtime.bundle import Bundle

    bundle_dir = os.fspath(bundle_dir)
    bundle = Bundle.load(
        bundle_dir
    )  # refuses a missing, altered or unknown bundle, or one whose graphs' IO differs
    manifest = bundle.manifest
    backends = list(backends) if backends else available_backends()
    if not backends:
        raise MissingDependencyError(
            "no backend to verify on: pip install 'rf_runtime[cpu]' (onnxruntime), or "
            "'rf_runtime[gpu]' on a machine with an NVIDIA GPU"
        )
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    paths = {name: bundle.graph_file(name) for name in bundle.graphs}
    if graphs:
        missing = sorted(set(graphs) - set(paths))
        if missing:
            raise InputError(f"graph(s) {missing} are not in {bundle_dir}; it has {sorted(paths)}")
        paths = {g: paths[g] for g in graphs}
    refs = References(model_dir, checkpoint)
    _check_same_model(manifest, refs.backend, bundle_dir, model_dir)
    plans = bundle.plans
    rows = []
    for i, (graph, path) in enumerate(sorted(paths.items())):
        name, precision = split_name(graph)
        base = unbatched(name)
        inputs, outputs = graph_io(bundle.graphs[graph])
        rng = np.random.default_rng([seed, i])
        if base == name:
            raw = refs.inputs(base, inputs, rng)
        else:  # a batch-B graph: B rows of the single-stream graph's inputs, each its own draw
            row_inputs, row_outputs = graph_io(bundle.graphs[base])
            n_rows = int(name.rpartition("_b")[2])  # dit_step_b4: 4 rows (graph_io.batched)
            draws = [refs.inputs(base, row_inputs, rng) for _ in range(n_rows)]
            raw = _batch_rows(draws, inputs, row_inputs)
        # the same values on both sides: round to the graph's input types first
        feeds = {n: raw[n].astype(dtype) for n, _, dtype in inputs}
        as_fp32 = {n: v if v.dtype == np.int64 else v.astype(np.float32) for n, v in feeds.items()}
        names = [n for n, _, _ in inputs]
        if base == name:
            expect = run_reference(refs.module(base), names, as_fp32)
        else:  # the reference of each row on its own, its outputs stacked as the graph's rows
            per_row = [
                run_reference(refs.module(base), names, row)
                for row in _unbatch_rows(as_fp32, inputs, row_inputs)
            ]
            expect = _join_outputs(per_row, outputs, row_outputs)
        tol = TOLERANCES[precision]

        def skip(reason: str) -> VerifyRow:
            nan = float("nan")
            return VerifyRow(graph, precision, backend, nan, nan, tol, "SKIP", reason)

        for backend in backends:
            plan = plans.get(graph, {}).get("file")
            if backend == "tensorrt" and plan is None:
                rows.append(skip("no TensorRT plan in the bundle (rf-export trt BUNDLE)"))
                continue
            if backend.startswith("onnxruntime") and precision == "bf16":
                why = (
                    "onnxruntime's CPU provider has no bf16 kernels"
                    if backend == "onnxruntime-cpu"
                    else "the onnxruntime runner takes no bf16 host arrays (numpy has no bf16)"
                )
                rows.append(skip(f"{why}; try --backends onnx-reference or tensorrt"))
                continue
            plan_path = bundle.file(plan) if plan else None
            got = _run_backend(
                backend, path, bundle.graphs[graph], feeds, [n for n, _, _ in outputs], plan_path
            )
            max_abs, rel = compare(got, expect)
            status = "PASS" if rel <= tol and np.isfinite(rel) else "FAIL"
            rows.append(VerifyRow(graph, precision, backend, max_abs, rel, tol, status))
    return rows


def _batch_axis(row_shape, shape) -> tuple[int, bool]:
    """Where a batched tensor holds its rows: (axis, False) when the single-stream tensor has a size-1
    batch axis there (the K/V's is axis 1, the others' axis 0), (axis, True) when the batched one
    inserts it (a cache state's mix)."""
    row_shape, shape = tuple(row_shape), tuple(shape)
    if shape == row_shape:
        raise ConfigError(f"a batched graph's output {shape} has no batch axis")
    for axis in range(len(shape)):
        if len(shape) == len(row_shape) and row_shape[axis] == 1:
            if shape[:axis] + shape[axis + 1 :] == row_shape[:axis] + row_shape[axis + 1 :]:
                return axis, False
        if len(shape) == len(row_shape) + 1 and shape[:axis] + shape[axis + 1 :] == row_shape:
            return axis, True
    raise ConfigError(f"a batched tensor {shape} does not hold rows of {row_shape}")


def _batch_rows(rows: list[dict], inputs, row_inputs) -> dict[str, np.ndarray]:
    """The feeds of a batched graph from one feed dict per row of the single-stream graph. An input
    the rows share (the same shape in both graphs: the step's sigma, the context's RoPE tables) takes
    row 0's draw, written into every row's dict so that each row's reference sees it too."""
    row_shapes = {name: shape for name, shape, _ in row_inputs}
    out = {}
    for name, shape, _ in inputs:
        if tuple(shape) == tuple(row_shapes[name]):
            for r in rows:
                r[name] = rows[0][name]
            out[name] = np.asarray(rows[0][name])
            continue
        axis, insert = _batch_axis(row_shapes[name], shape)
        parts = [np.asarray(r[name]) for r in rows]
        out[name] = np.stack(parts, axis) if insert else np.concatenate(parts, axis)
    return out


def _unbatch_rows(feeds: dict, inputs, row_inputs) -> list[dict]:
    """The inverse of ``_batch_rows``: one feed dict per row, in the single-stream graph's shapes."""
    shapes = {name: shape for name, shape, _ in inputs}
    first = next(n for n, shape, _ in row_inputs if tuple(shape) != tuple(shapes[n]))
    row_shape = dict((n, s) for n, s, _ in row_inputs)[first]
    rows = [{} for _ in range(shapes[first][_batch_axis(row_shape, shapes[first])[0]])]
    for name, row_shape, _ in row_inputs:
        if tuple(shapes[name]) == tuple(row_shape):  # shared by the rows
            for r in rows:
                r[name] = feeds[name]
            continue
        axis, _ = _batch_axis(row_shape, shapes[name])
        for i, part in enumerate(np.split(feeds[name], len(rows), axis)):
            rows[i][name] = part.reshape(row_shape)
    return rows


def _join_outputs(per_row: list[list], outputs, row_outputs) -> list[np.ndarray]:
    """The reference's outputs of each row joined into the batched graph's output shapes."""
    joined = []
    for k, ((_, shape, _), (_, row_shape, _)) in enumerate(zip(outputs, row_outputs)):
        axis, insert = _batch_axis(row_shape, shape)
        parts = [r[k] for r in per_row]
        joined.append(np.stack(parts, axis) if insert else np.concatenate(parts, axis))
    return joined


def compare(got, expect) -> tuple[float, float]:
    """(max abs error, relative error ``||got - ref|| / ||ref||``) of the worst output.

    Kept here rather than through Polygraphy's ``Comparator``: verify runs the runtime's own runners
    (``OnnxRuntimeRunner``, ``TensorRTRunner``: the code that streams; Polygraphy's runners are a
    different implementation of the same calls) against a PyTorch module fed well-formed inputs per
    graph kind, and its one criterion, the relative L2 error, is these three lines (Polygraphy's
    ``CompareFunc.snr`` is the same number as -20 log10(rel); wrapping our outputs into its
    ``RunResults`` to compute it would add a dependency and its log output, not a check).
    """
    max_abs, rel = 0.0, 0.0
    for g_out, ref in zip(got, expect):
        diff = np.asarray(g_out).astype(np.float32) - ref
        max_abs = max(max_abs, float(np.abs(diff).max(initial=0.0)))
        norm = float(np.linalg.norm(ref))
        rel = max(rel, float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff)))
    return max_abs, rel


def format_table(rows: list[VerifyRow]) -> str:
    head = ("graph", "precision", "backend", "max abs err", "rel err", "tol", "result")

    def num(x: float) -> str:
        return f"{x:.3e}" if np.isfinite(x) else "-"

    body = [
        (
            r.graph,
            r.precision,
            r.backend,
            num(r.max_abs),
            num(r.rel),
            f"{r.tol:.0e}",
            r.status + (f" ({r.note})" if r.note else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(x[c])) for x in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(str(x[c]).ljust(widths[c]) for c in range(len(head))).rstrip() for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
