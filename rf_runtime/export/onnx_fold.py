"""Constant folding for static-shape ONNX graphs, through Polygraphy's ``fold_constants``.

The TorchScript exporter leaves shape arithmetic in the graph (Shape -> Gather -> Concat ->
Reshape) and, for a few ops, an ``If`` whose condition is a shape test. Every input of our graphs
has a static shape, so all of that is constant: Polygraphy's ``fold_constants`` (onnx-graphsurgeon
evaluating the constant part with onnxruntime, shapes folded, ``If`` nodes with a known condition
replaced by their taken branch, ONNX shape inference after each pass, run from a file for models
over 2 GB) folds it, pass after pass until nothing changes. The precision lowering
(``export.precision``) runs on the folded graph, so it never meets a subgraph or an untyped value:
what this module adds is the check of those two properties (a ConfigError otherwise, never a
silently unfolded graph) and the size limit that keeps weights and large tables out of the folding.

Measured against the hand-written pass this replaced and against onnxscript's optimizer in
docs/notes/export.md (``scripts/compare_folding.py``): the same node counts as the old pass, outputs
bit-identical; onnxscript leaves the VAE's ``If`` nodes and most VAE values untyped.
"""

from __future__ import annotations

import logging

import onnx

from rf_runtime.errors import ConfigError, MissingDependencyError

# Folding a node whose output is larger than this would add a large initializer to the file (the
# umT5 position bias is [heads, 512, 512] per layer); only shape arithmetic and small tables need it.
MAX_FOLDED_ELEMENTS = 1 << 16
MAX_FOLDED_BYTES = MAX_FOLDED_ELEMENTS * 4


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _outputs_from_nodes(g: onnx.GraphProto) -> None:
    """Polygraphy turns a graph output whose value is constant (a VAE cache slot that is all zeros after
    the first frame) into an initializer of that name; the graph contract, the lowering and the runners
    want every output computed by a node, so it gets its value through an Identity again (in place)."""
    produced = {o for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    for out in g.output:
        if out.name in produced:
            continue
        if out.name not in inits:
            raise ConfigError(f"graph output {out.name!r} has no producer after constant folding")
        inits[out.name].name = f"{out.name}_value"
        g.node.append(
            onnx.helper.make_node("Identity", [f"{out.name}_value"], [out.name], name=f"{out.name}/Identity")
        )


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """``model`` without its large initializers (over ``MAX_FOLDED_BYTES``): each one becomes a graph
    input of its type and shape, and is returned by name (the model's own TensorProto, not a copy).
    Folding never stores a value that large, so it folds this light model to the same graph, without
    copying or evaluating gigabytes of weights (a 1.3B DiT step holds 5.7 GB of them in fp32)."""
    g = model.graph
    weights = {t.name: t for t in g.initializer if _tensor_bytes(t) > MAX_FOLDED_BYTES}
    as_inputs = [
        onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)) for name, t in weights.items()
    ]
    graph = onnx.helper.make_graph(
        list(g.node),
        g.name,
        [*g.input, *as_inputs],
        list(g.output),
        [t for t in g.initializer if t.name not in weights],
        value_info=list(g.value_info),
    )
    light = onnx.helper.make_model(
        graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
    )
    return light, weights


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with every value computable from constants and static shapes folded, every value
    typed (``value_info``). ``model`` is not changed. Raises ConfigError if a subgraph is left (an
    ``If`` whose condition depends on data) or a value has no type, since the lowering cannot type it."""
    folded, weights = fold_structure(model)
    g = folded.graph
    keep = [v for v in g.input if v.name not in weights]
    del g.input[:]
    g.input.extend(keep)
    g.initializer.extend(weights.values())  # copies: callers that want no copy use fold_structure
    return folded


def fold_structure(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """``fold_constants`` without the large weights: the folded graph has them as extra graph inputs,
    and they are returned by name (``model``'s tensors, shared, not copied; see ``split_weights``)."""
    try:
        from polygraphy.backend.onnx import fold_constants as polygraphy_fold
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise MissingDependencyError(
            "constant folding needs polygraphy and onnx-graphsurgeon: pip install 'rf_runtime[export]'"
        ) from exc
    try:
        import onnxruntime  # Polygraphy folds through onnxruntime (without it, silently less)
    except ImportError as exc:
        raise MissingDependencyError(
            "constant folding runs the constant part of a graph through onnxruntime: pip "
            "install 'rf_runtime[cpu]' (or [gpu] on a GPU machine)"
        ) from exc
    G_LOGGER.use_python_logging_system = True  # library code never prints
    G_LOGGER.python_logger = logging.getLogger("rf_runtime.polygraphy")
    light, weights = split_weights(model)
    # the folding sessions' graph-optimizer warnings (e.g. "UnsqueezeElimination cannot remove node")
    # go to stderr by default; 2 (warning) is onnxruntime's default level, restored after
    onnxruntime.set_default_logger_severity(3)
    try:
        folded = polygraphy_fold(light, fold_shapes=True, error_ok=False, size_threshold=MAX_FOLDED_BYTES)
    finally:
        onnxruntime.set_default_logger_severity(2)
    del light
    missing = [name for name in weights if name not in {v.name for v in folded.graph.input}]
    if missing:
        raise ConfigError(f"constant folding dropped the weight inputs {missing[:3]}")
    g = folded.graph
    _outputs_from_nodes(g)
    for node in g.node:
        if _has_subgraph(node):
            raise ConfigError(
                f"node {node.name} ({node.op_type}) still has a subgraph after constant folding: "
                "its condition depends on data, which the precision lowering cannot type"
            )
    typed = {v.name for v in (*g.value_info, *g.input, *g.output)} | {t.name for t in g.initializer}
    untyped = [o for n in g.node for o in n.output if o and o not in typed]
    if untyped:
        raise ConfigError(
            f"after constant folding {len(untyped)} values have no type (first: {untyped[:3]}): ONNX "
            "shape inference could not type them, and the precision lowering needs every type"
        )
    return folded, weights
