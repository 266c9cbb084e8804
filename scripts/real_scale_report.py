"""What scripts/real_scale_export.sh reports about a bundle (the measurements of docs/notes/export.md,
"Export at real scale"). One subcommand per step, each printing its table:

    python scripts/real_scale_report.py files BUNDLE            # every file's size, external-data layout,
                                                                # node counts, the TensorRT view's problems
    python scripts/real_scale_report.py stream BUNDLE [CHUNKS]  # stream CHUNKS chunks through
                                                                # Streamer.from_engine: RSS before / after
                                                                # the load and after each chunk, against
                                                                # rf-bench --estimate's numbers
    python scripts/real_scale_report.py step BUNDLE             # one dit_step of the fp32 graph through
                                                                # onnxruntime CPU, timed once

The TensorRT view reads the support matrix tests/data/tensorrt10_onnx_operators.csv (TensorRT 10's
parser, operators.md). Exit 1 when the TensorRT view finds a problem.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX = os.path.join(ROOT, "tests", "data", "tensorrt10_onnx_operators.csv")
MIB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def folded_nodes(bundle_dir: str, manifest: dict, graph: str) -> int:
    """Nodes of the graph after constant folding (the low-precision variants are stored folded; the fp32
    graphs as the exporter wrote them), folded without reading its external weights."""
    import onnx

    from rf_runtime.export.onnx_fold import fold_structure

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from rf_runtime.export.onnx_fold import MAX_FOLDED_BYTES

    path = os.path.join(bundle_dir, manifest["files"][manifest["graphs"][graph]["file"]]["path"])
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:  # the small external tensors are constants the folding evaluates
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            if info.length and info.length <= MAX_FOLDED_BYTES:
                with open(os.path.join(os.path.dirname(path), info.location), "rb") as f:
                    f.seek(info.offset or 0)
                    t.raw_data = f.read(info.length)
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
    return len(fold_structure(model)[0].graph.node)


def files(bundle_dir: str) -> int:
    import json

    from rf_runtime.export.trt_view import check_bundle

    with open(os.path.join(bundle_dir, "manifest.json")) as f:
        manifest = json.load(f)
    print("| file | MiB |\n|---|---|")
    for key, entry in sorted(manifest["files"].items()):
        print(f"| {entry['path']} | {entry['bytes'] / MIB:.1f} |")
    started = time.perf_counter()
    views = check_bundle(bundle_dir, MATRIX)
    print(
        f"\nTensorRT view ({time.perf_counter() - started:.0f} s: hashes, IO, ops and types, static shapes, strong typing)"
    )
    print(
        "| graph | nodes | folded | external tensors | external MiB | inline MiB | problems |\n"
        "|---|---|---|---|---|---|---|"
    )
    bad = 0
    for v in views:
        bad += len(v.problems)
        print(
            f"| {v.name} | {v.nodes} | {folded_nodes(bundle_dir, manifest, v.name)} | {v.external_tensors} | {v.external_bytes / MIB:.1f} | "
            f"{v.inline_bytes / MIB:.1f} | {len(v.problems)} |"
        )
        for p in v.problems[:5]:
            print(f"    {p}")
    return 1 if bad else 0


def stream(bundle_dir: str, chunks: int = 3) -> int:
    from rf_runtime import memory
    from rf_runtime.streamer import Streamer

    (row,) = memory.estimates(memory.read_bundle(bundle_dir), "cpu")
    before = rss()
    started = time.perf_counter()
    streamer = Streamer.from_engine(bundle_dir, backend="onnxruntime")
    loaded = rss()
    print(f"load {time.perf_counter() - started:.1f} s, RSS {before / MIB:.0f} -> {loaded / MIB:.0f} MiB")
    stream = streamer.open("a red fox running through fresh snow", seed=0)
    per_chunk = []
    for i, chunk in zip(range(chunks), stream):
        per_chunk.append(rss())
        print(
            f"chunk {i}: {chunk.frames.shape} frames, {chunk.seconds:.1f} s, RSS {per_chunk[-1] / MIB:.0f} MiB"
        )
    stream.close()
    print("\n| part | estimate MiB |\n|---|---|")
    for part, value in row.parts.items():
        print(f"| {part} | {value / MIB:.1f} |")
    print(f"| total | {row.total / MIB:.1f} |")
    print(
        f"\nmeasured: load adds {(loaded - before) / MIB:.0f} MiB (estimate of the weights "
        f"{row.parts['weights'] / MIB:.0f}); streaming adds {(max(per_chunk) - loaded) / MIB:.0f} MiB "
        f"(estimate of one stream's buffers {row.per_stream / MIB:.0f} + activations "
        f"{row.parts['activations'] / MIB:.0f}); peak RSS {max(per_chunk) / MIB:.0f} MiB against the "
        f"estimate's total {row.total / MIB:.0f} MiB + the process before loading {before / MIB:.0f}"
    )
    return 0


def step(bundle_dir: str) -> int:
    """One fp32 dit_step through an onnxruntime CPU session as the runner makes it, but without the
    memory arena and the memory pattern (at 480x832 one layer's attention scores are 3.2 GB; freed
    blocks kept in the arena would take the step past 16 GiB)."""
    import numpy as np
    import onnxruntime as ort

    from rf_runtime.bundle import Bundle

    bundle = Bundle.load(bundle_dir, verify_hashes=False)
    spec = bundle.graphs["dit_step"]
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    started = time.perf_counter()
    session = ort.InferenceSession(bundle.graph_file("dit_step"), options, providers=["CPUExecutionProvider"])
    print(f"dit_step session: {time.perf_counter() - started:.0f} s, RSS {rss() / MIB:.0f} MiB")
    feeds = {t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in spec.inputs}
    feeds["key_mask"][:] = 1.0
    print(f"inputs made: RSS {rss() / MIB:.0f} MiB")
    started = time.perf_counter()
    out = session.run(None, feeds)
    took = time.perf_counter() - started
    finite = all(np.isfinite(v).all() for v in out)
    print(
        f"one dit_step (fp32, onnxruntime CPU, {options.intra_op_num_threads or 'default'} threads): "
        f"{took:.1f} s, RSS after {rss() / MIB:.0f} MiB, outputs finite: {finite}"
    )
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("files", "stream", "step"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "files":
        return files(argv[1])
    if argv[0] == "stream":
        return stream(argv[1], int(argv[2]) if len(argv) > 2 else 3)
    return step(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
