"""Constant folding for static-shape ONNX graphs, with onnx's reference evaluator (no onnxruntime).

The TorchScript exporter leaves shape arithmetic in the graph (Shape -> Gather -> Concat ->
Reshape) and, for a few ops, an ``If`` whose condition is a shape test. Every input of our graphs
has a static shape, so all of that is constant: ``fold_constants`` walks the graph once, tracking
the type and shape of every value, evaluates what is computable from constants and static
shapes, inlines the taken branch of every ``If`` and removes what became dead. The precision
lowering (``export.precision``) runs on the folded graph, so it never meets a subgraph or an
untyped shape computation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from rf_runtime.errors import ConfigError

# Folding a node whose output is larger than this would add a large initializer to the file;
# only shape arithmetic and small tables need folding.
MAX_FOLDED_ELEMENTS = 1 << 16


def _static_shape(t: onnx.TypeProto) -> list[int] | None:
    tt = t.tensor_type
    if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
        return None
    return [d.dim_value for d in tt.shape.dim]


def _type_of(array: np.ndarray) -> onnx.TypeProto:
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor_type_proto(elem, list(array.shape))


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every value computable from constants and static shapes folded.

    Identity nodes become aliases, ``Constant`` nodes become initializers, an ``If`` with a known
    condition is replaced by its taken branch. Raises ConfigError if a subgraph is left (an ``If``
    whose condition depends on data), since the lowering cannot type it.
    """
    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # weights are never folded: only small initializers are read into numpy
    big = {t.name: t for t in g.initializer if int(np.prod(t.dims)) > MAX_FOLDED_ELEMENTS}
    known: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.name not in big}
    types: dict[str, onnx.TypeProto] = {v.name: v.type for v in g.input}
    types.update({n: _type_of(a) for n, a in known.items()})
    types.update({n: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for n, t in big.items()})
    alias: dict[str, str] = {}
    graph_outputs = {o.name for o in g.output}
    kept: list[onnx.NodeProto] = []

    def name_of(x: str) -> str:
        while x in alias:
            x = alias[x]
        return x

    def set_known(name: str, value) -> None:
        known[name] = np.asarray(value)
        types[name] = _type_of(known[name])

    work = list(g.node)
    while work:
        node = _renamed(work.pop(0), name_of)
        ins = [i for i in node.input if i]
        if node.op_type == "Identity" and node.output[0] not in graph_outputs:
            alias[node.output[0]] = node.input[0]
            continue
        if node.op_type == "Constant":
            set_known(node.output[0], ReferenceEvaluator(node).run(None, {})[0])
            continue
        if node.op_type == "Shape" and node.input[0] in types and _static_shape(types[node.input[0]]) is not None:
            attrs = {a.name: a.i for a in node.attribute}
            dims = _static_shape(types[node.input[0]])[attrs.get("start", 0):attrs.get("end", None)]
            set_known(node.output[0], np.array(dims, np.int64))
            continue
        if node.op_type == "If" and node.input[0] in known:
            branch = "then_branch" if bool(known[node.input[0]].reshape(-1)[0]) else "else_branch"
            sub = next(a.g for a in node.attribute if a.name == branch)
            work[:0] = list(sub.node) + [helper.make_node("Identity", [o.name], [out])
                                         for o, out in zip(sub.output, node.output)]
            continue
        if ins and all(i in known for i in ins) and not _has_subgraph(node):
            try:
                values = ReferenceEvaluator(node).run(None, {i: known[i] for i in ins})
            except Exception:  # an op the reference evaluator lacks: keep it in the graph
                values = None
            if values is not None and all(np.asarray(v).size <= MAX_FOLDED_ELEMENTS for v in values):
                for o, v in zip(node.output, values):
                    if o:
                        set_known(o, v)
                continue
        kept.append(node)
        if not _has_subgraph(node):
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            data = {i: numpy_helper.from_array(known[i], i) for i in ins if i in known}
            try:
                types.update(onnx.shape_inference.infer_node_outputs(
                    schema, node, {i: types[i] for i in ins if i in types}, data, opset_imports=list(model.opset_import)))
            except Exception:  # shape unknown: later Shape nodes on it stay in the graph
                pass

    # graph outputs that became aliases or constants keep their names through an Identity
    # (a constant output, e.g. a VAE cache slot that is all zeros after the first frame, stays a node output)
    for out in g.output:
        src = name_of(out.name)
        if src == out.name and src in known:
            src = f"{out.name}_value"
            known[src] = known.pop(out.name)
        if src != out.name:
            kept.append(helper.make_node("Identity", [src], [out.name], name=f"{out.name}/Identity"))

    needed = {o.name for o in g.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(kept):
        if any(o in needed for o in node.output):
            if _has_subgraph(node):
                raise ConfigError(f"node {node.name} ({node.op_type}) still has a subgraph after constant folding: "
                                  "its condition depends on data, which the precision lowering cannot type")
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()

    inputs = {i.name for i in g.input}
    initializers = [big[n] if n in big else numpy_helper.from_array(known[n], n)
                    for n in sorted(needed) if (n in known or n in big) and n not in inputs]
    # the types tracked node by node: no whole-model shape inference, which cannot serialize > 2 GB
    outputs = {o.name for o in g.output}
    value_info = [helper.make_value_info(o, types[o]) for n in live for o in n.output
                  if o and o in types and o not in outputs]
    graph = helper.make_graph(live, g.name, list(g.input), list(g.output), initializers, value_info=value_info)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             producer_name=model.producer_name, producer_version=model.producer_version)


def _renamed(node: onnx.NodeProto, name_of) -> onnx.NodeProto:
    if all(name_of(i) == i for i in node.input):
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.input[:]
    new.input.extend(name_of(i) if i else i for i in node.input)
    return new
