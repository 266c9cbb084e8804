"""Node counts of ``export.onnx_fold`` (Polygraphy's fold_constants) and of onnxscript's optimizer on raw
exported graphs, their outputs against the raw graph's through onnxruntime CPU, subgraphs left and
node outputs without a type (docs/notes/export.md). Needs ``pip install onnxscript``:

    python scripts/compare_folding.py BUNDLE/dit_step.onnx BUNDLE/vae_decode_first.onnx ...
"""

import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer

from rf_runtime.export.onnx_fold import fold_constants


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def random_feeds(model):
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.input:
        t = v.type.tensor_type
        feeds[v.name] = rng.standard_normal([d.dim_value for d in t.shape.dim]).astype(
            onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        )
    return feeds


def describe(model, ref, feeds, seconds):
    g = model.graph
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, run(model, feeds)))
    subgraphs = sum(
        1
        for n in g.node
        for a in n.attribute
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    )
    typed = {v.name for v in (*g.value_info, *g.output)}
    untyped = sum(1 for n in g.node for o in n.output if o and o not in typed)
    return f"{len(g.node)} nodes ({seconds:.1f} s, max abs diff {diff:.1e}, {subgraphs} subgraphs, {untyped} untyped)"


def main():
    for path in sys.argv[1:]:
        raw = onnx.load(path)
        feeds = random_feeds(raw)
        ref = run(raw, feeds)
        t = time.perf_counter()
        ours = fold_constants(onnx.load(path))
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        other = onnxscript.optimizer.optimize(onnx.load(path), num_iterations=2, onnx_shape_inference=True)
        t_other = time.perf_counter() - t
        print(
            f"{path}: raw {len(raw.graph.node)} nodes\n  export.onnx_fold: {describe(ours, ref, feeds, t_ours)}\n"
            f"  onnxscript:       {describe(other, ref, feeds, t_other)}"
        )


if __name__ == "__main__":
    main()
