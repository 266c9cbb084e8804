"""Node counts of export.onnx_fold against onnxscript's optimizer on raw exported graphs, and their outputs through
onnxruntime (docs/notes/export.md). Needs `pip install onnxscript`: python scripts/compare_folding.py BUNDLE/dit_step.onnx ..."""
import sys, time, collections
import numpy as np, onnx, onnxruntime as ort
import onnxscript.optimizer as oso
import onnx_ir as ir
from export.onnx_fold import fold_constants

def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)

def feeds_for(model):
    rng = np.random.default_rng(0); f = {}
    for v in model.graph.input:
        t = v.type.tensor_type; shape = [d.dim_value for d in t.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        f[v.name] = rng.standard_normal(shape).astype(dt)
    return f

def subgraphs(m): return sum(1 for n in m.graph.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))

for name in sys.argv[1:]:
    m = onnx.load(name)
    t=time.time(); ours = fold_constants(m); t1=time.time()-t
    t=time.time()
    osm = oso.optimize(onnx.load(name), num_iterations=2, onnx_shape_inference=True)
    t2=time.time()-t
    f = feeds_for(m)
    ref = run(m, f); a = run(ours, f); b = run(osm, f)
    da = max(float(np.abs(x-y).max()) for x,y in zip(ref,a)); db = max(float(np.abs(x-y).max()) for x,y in zip(ref,b))
    vi = {v.name for v in osm.graph.value_info}
    outs = [o for n in osm.graph.node for o in n.output if o]
    missing = [o for o in outs if o not in vi and o not in {x.name for x in osm.graph.output}]
    print(f"{name}: raw {len(m.graph.node)} ours {len(ours.graph.node)} ({t1:.1f}s, maxdiff {da:.2e}, subgraphs {subgraphs(ours)}) onnxscript {len(osm.graph.node)} ({t2:.1f}s, maxdiff {db:.2e}, subgraphs {subgraphs(osm)}, untyped outputs {len(missing)})")
    print("  ops ours-only", sorted(set(collections.Counter(n.op_type for n in ours.graph.node)) - set(n.op_type for n in osm.graph.node)), "os-only", sorted(set(n.op_type for n in osm.graph.node) - set(n.op_type for n in ours.graph.node)))
