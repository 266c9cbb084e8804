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


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with every value computable from constants and static shapes folded, every value
    typed (``value_info``). ``model`` is not changed. Raises ConfigError if a subgraph is left (an
    ``If`` whose condition depends on data) or a value has no type, since the lowering cannot type it."""
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
    # the folding sessions' graph-optimizer warnings (e.g. "UnsqueezeElimination cannot remove node")
    # go to stderr by default; 2 (warning) is onnxruntime's default level, restored after
    onnxruntime.set_default_logger_severity(3)
    try:
        folded = polygraphy_fold(model, fold_shapes=True, error_ok=False, size_threshold=MAX_FOLDED_BYTES)
    finally:
        onnxruntime.set_default_logger_severity(2)
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
    return folded
