"""Strongly typed fp16 / bf16 variants of the exported fp32 graphs (for TensorRT).

TensorRT 11 only builds strongly typed networks: every tensor's element type comes from the ONNX
graph, nothing is chosen by the builder. ``lower_graph`` rewrites a traced fp32 graph into such a
graph, with one explicit element type per tensor and explicit ``Cast`` nodes where types change:

* it first folds every shape computation (``rf_runtime.export.onnx_fold``), so no untyped shape arithmetic or
  ``If`` subgraph is left;
* each node computes either in the low precision or in float32. Float32 are the numerically
  sensitive parts, as the PyTorch reference keeps them: the nodes inside normalization modules
  (RMSNorm / LayerNorm statistics and scaling), the timestep embedding MLP, the sampler's x0 and
  re-noise arithmetic, the cache update (the EMA-Sink fold ``alpha * sink + (1 - alpha) * evicted``
  would lose its small update in fp16 arithmetic), and every softmax together with its logit
  scaling and masking (a ``Cast`` to float32 right after the logits ``MatMul``, a ``Cast`` back
  before the probabilities multiply the values);
* bf16 only: an op whose ONNX schema at the graph's opset takes no bfloat16 (opset 17's ``Conv``
  and ``Einsum``) computes in float32 (``op_allows``);
* weights are stored in the type of the node that reads them (a weight read in both is stored twice);
* graph inputs and outputs are in the low precision, except the ones a ``GraphPolicy`` keeps in
  float32: the small tensors whose arithmetic is float32 anyway (latents, noise, sigma, the host's
  timestep sinusoid, RoPE tables, the key mask, decoded frames). The large ones (text and cache
  K/V, the VAE feature cache) are low precision.

``check_strongly_typed`` verifies the result: shape inference types every value and no node mixes
float types among its inputs (except the inputs ONNX defines with their own type: ``Cast``'s
input, ``Resize``'s ``roi``/``scales``, ``Shape``'s input).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rf_runtime.export import onnx_files
from rf_runtime.export.onnx_files import save_onnx
from rf_runtime.export.onnx_fold import fold_structure
from rf_runtime.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOAT = TensorProto.FLOAT
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
TYPE_NAMES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
# Inputs whose type ONNX does not tie to the node's other inputs.
TYPE_FREE_INPUTS = {"Cast": {0}, "Shape": {0}, "Size": {0}, "Resize": {1, 2}}
# Elementwise ops between a logits MatMul and its Softmax (scaling, masking): computed in fp32.
SOFTMAX_ISLAND_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Neg"}
# Statistics ops: float32 wherever they occur, whatever module they come from.
STATISTICS_OPS = {"ReduceMean", "ReduceL2", "ReduceSum", "LayerNormalization"}
FP16_MAX = float(np.finfo(np.float16).max)
logger = logging.getLogger("rf_runtime")


@dataclass(frozen=True)
class GraphPolicy:
    """Which tensors of a graph stay float32 in its low-precision variant.

    fp32_io: graph inputs / outputs kept float32 (the others float ones become low precision).
    fp32_node: node name -> True where the node computes in float32 (softmax islands always do).
    """

    fp32_io: frozenset[str] = frozenset()
    fp32_node: Callable[[str], bool] = field(default=lambda name: False)


def lower_graph(model: onnx.ModelProto, precision: str, policy: GraphPolicy) -> onnx.ModelProto:
    """The strongly typed ``precision`` ("fp16" or "bf16") variant of the fp32 graph ``model``."""
    if precision not in LOW_TYPES:
        raise ConfigError(
            f"precision must be one of {sorted(LOW_TYPES)} for a lowered graph, got {precision!r}"
        )
    low = LOW_TYPES[precision]
    # folded without its large weights (graph inputs there): they are read from ``model`` once, when
    # converted, so a graph is never held twice in fp32 (5.7 GB for the 1.3B DiT step)
    model, weights = fold_structure(model)
    g = model.graph
    graph_inputs = [v for v in g.input if v.name not in weights]
    old_types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    old_types.update({t.name: t.data_type for t in g.initializer})
    inits = {**{t.name: t for t in g.initializer}, **weights}
    island = softmax_islands(g)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def wanted(node: onnx.NodeProto) -> int:
        """The element type a node computes in (see the module docstring)."""
        first_float = next((k for k, i in enumerate(node.input) if old_types.get(i) == FLOAT), 0)
        sensitive = node.name in island or node.op_type in STATISTICS_OPS or policy.fp32_node(node.name)
        return FLOAT if sensitive or not op_allows(node.op_type, opset, low, first_float) else low

    types: dict[str, int] = {}  # element type of every float value of the new graph
    for v in graph_inputs:
        if old_types[v.name] == FLOAT:
            types[v.name] = FLOAT if v.name in policy.fp32_io else low
    init_requests: dict[str, set[int]] = defaultdict(set)
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def typed(name: str, t: int) -> str:
        """The value ``name`` in element type t: a typed initializer, or a Cast of the value."""
        if name in inits:
            init_requests[name].add(t)
            return f"{name}::{t}"
        if types[name] == t:
            return name
        key = (name, t)
        if key not in casts:
            casts[key] = f"{name}_{TYPE_NAMES[t]}"
            nodes.append(
                helper.make_node("Cast", [name], [casts[key]], to=t, name=f"{name}/Cast_{TYPE_NAMES[t]}")
            )
            types[casts[key]] = t
        return casts[key]

    def current(name: str) -> int:
        return types[name] if name not in inits else FLOAT

    for node in g.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        float_in = [k for k, i in enumerate(node.input) if i and old_types.get(i) == FLOAT]
        float_out = [o for o in node.output if old_types.get(o) == FLOAT]
        if node.op_type == "Cast":
            t = wanted(node)
            for a in new.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = t
            if node.input[0] in inits:
                new.input[0] = typed(node.input[0], FLOAT)
        elif not float_out:  # comparisons, Shape...: follow the type of the first float input
            t = current(node.input[float_in[0]]) if float_in else low
            free = TYPE_FREE_INPUTS.get(node.op_type, set())
            for k in float_in:
                if k not in free:
                    new.input[k] = typed(node.input[k], t)
        else:
            t = wanted(node)
            free = TYPE_FREE_INPUTS.get(node.op_type, set())
            for k in float_in:
                new.input[k] = typed(node.input[k], FLOAT if k in free else t)
            if node.op_type == "ConstantOfShape":
                for a in new.attribute:
                    if a.name == "value" and a.t.data_type == FLOAT:
                        a.t.CopyFrom(_convert(numpy_helper.to_array(a.t), t, a.t.name))
        if any(a.name == "dtype" for a in node.attribute):  # EyeLike, Random*: not in our graphs
            raise ConfigError(
                f"node {node.name} ({node.op_type}) sets its output type by attribute, which the "
                "precision lowering does not handle"
            )
        for o in float_out:
            types[o] = t
        nodes.append(new)

    wanted_outputs = {
        v.name: FLOAT if v.name in policy.fp32_io else low for v in g.output if old_types[v.name] == FLOAT
    }
    nodes += _cast_outputs(nodes, types, wanted_outputs)
    initializers = _typed_initializers(inits, init_requests, nodes)  # converted while the graph is filled

    def io(values):
        out = []
        for v in values:
            vt = v.type.tensor_type
            elem = types.get(v.name, vt.elem_type)
            out.append(helper.make_tensor_value_info(v.name, elem, [d.dim_value for d in vt.shape.dim]))
        return out

    graph = helper.make_graph(nodes, f"{g.name}_{precision}", io(graph_inputs), io(g.output))
    lowered = helper.make_model(
        graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name="rf_runtime rf_runtime.export.precision",
    )
    # one converted tensor at a time into the model itself (make_graph / make_model copy their arguments)
    for tensor in initializers:
        lowered.graph.initializer.append(tensor)
    if not onnx_files.over_limit(lowered):  # larger graphs are checked from their file (lower_file)
        _check(lowered, precision)
    return lowered


def _cast_outputs(nodes: list, types: dict, wanted: dict[str, int]) -> list:
    """Give each graph output its declared type: where the computed type differs, the producer's
    output is renamed and a final Cast writes the output. Returns the Cast nodes; updates ``types``."""
    renames = {}
    for name, want in wanted.items():
        if types[name] != want:
            renames[name] = f"{name}_{TYPE_NAMES[types[name]]}"
            types[renames[name]] = types[name]
            types[name] = want
    for n in nodes:
        for k, i in enumerate(n.input):
            if i in renames:
                n.input[k] = renames[i]
        for k, o in enumerate(n.output):
            if o in renames:
                n.output[k] = renames[o]
    return [
        helper.make_node("Cast", [inner], [name], to=types[name], name=f"{name}/Cast_out")
        for name, inner in renames.items()
    ]


def _typed_initializers(inits: dict, requests: dict, nodes: list):
    """One tensor per requested element type of each float initializer (named as before where only
    one type is read, else suffixed); the nodes' ``<name>::<type>`` placeholders are resolved now,
    the tensors are converted one by one as the returned iterator is consumed."""
    plan, names = [], {}
    for name, tensor in inits.items():
        if tensor.data_type != FLOAT:
            plan.append((tensor, None, None))
            continue
        wanted = sorted(requests.get(name, ()))
        for t in wanted:
            names[f"{name}::{t}"] = name if len(wanted) == 1 else f"{name}_{TYPE_NAMES[t]}"
            plan.append((tensor, t, names[f"{name}::{t}"]))
    for n in nodes:
        for k, i in enumerate(n.input):
            if i in names:
                n.input[k] = names[i]
    return (
        tensor if t is None else _convert(numpy_helper.to_array(tensor), t, new) for tensor, t, new in plan
    )


def _check(model: onnx.ModelProto | str, precision: str) -> None:
    """The ONNX checker (with shape inference) and the strong-typing check, on a model or a file."""
    onnx.checker.check_model(model, full_check=True)
    problems = check_strongly_typed(model)
    if problems:
        raise ConfigError(
            f"the {precision} lowering produced a graph that is not strongly typed: {problems[:5]}"
        )


def op_allows(op_type: str, opset: int, elem_type: int, index: int = 0) -> bool:
    """Whether the ONNX schema of ``op_type`` at ``opset`` accepts ``elem_type`` for input ``index``
    (opset 17's Conv, for one, takes no bfloat16: such nodes compute in float32)."""
    schema = onnx.defs.get_schema(op_type, opset)
    if not schema.inputs:
        return True
    type_str = schema.inputs[min(index, len(schema.inputs) - 1)].type_str
    name = f"tensor({helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != TensorProto.BFLOAT16 else 'bfloat16'})"
    for c in schema.type_constraints:
        if c.type_param_str == type_str:
            return name in c.allowed_type_strs
    return True


def _convert(array: np.ndarray, t: int, name: str) -> onnx.TensorProto:
    if array.dtype != np.float32:
        return numpy_helper.from_array(array, name)
    if t == TensorProto.FLOAT16:
        finite = np.isfinite(array)
        array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)
    elif t == TensorProto.BFLOAT16:
        import ml_dtypes

        array = array.astype(ml_dtypes.bfloat16)
    return numpy_helper.from_array(array, name)


def softmax_islands(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes computed in float32 around every Softmax: the scaling and masking
    between the logits MatMul and the Softmax, the Softmax, and the NaN guard after it."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    island: set[str] = set()
    for n in graph.node:
        if n.op_type != "Softmax":
            continue
        island.add(n.name)
        stack = [n.input[0]]
        while stack:
            p = producers.get(stack.pop())
            if p is not None and p.op_type in SOFTMAX_ISLAND_OPS and p.name not in island:
                island.add(p.name)
                stack.extend(p.input)
        for c in consumers[n.output[0]]:
            if c.op_type in ("IsNaN", "Where"):
                island.add(c.name)
    return island


def typed_graph(model_or_path) -> tuple[onnx.GraphProto, dict[str, int]]:
    """The graph with shape inference run (from the file for a path: any size, weights not read) and
    the element type of every value."""
    if isinstance(model_or_path, str):
        with tempfile.TemporaryDirectory() as tmp:
            inferred = os.path.join(tmp, "inferred.onnx")
            onnx.shape_inference.infer_shapes_path(model_or_path, inferred, strict_mode=True)
            model = onnx.load(inferred, load_external_data=False)
    else:
        model = onnx.shape_inference.infer_shapes(model_or_path, strict_mode=True)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return g, types


def check_strongly_typed(model: onnx.ModelProto | str) -> list[str]:
    """Problems that keep ``model`` (or the .onnx file at that path, of any size) from being strongly
    typed (empty when it is): a value without an element type after shape inference, or a node
    whose float inputs mix element types."""
    g, types = typed_graph(model)
    problems = []
    for n in g.node:
        for o in n.output:
            if o and not types.get(o):
                problems.append(f"{n.name}: output {o} has no element type")
        free = TYPE_FREE_INPUTS.get(n.op_type, set())
        found = {
            types.get(i) for k, i in enumerate(n.input) if i and k not in free and types.get(i) in FLOAT_TYPES
        }
        if len(found) > 1:
            problems.append(
                f"{n.name} ({n.op_type}) mixes input types {sorted(TYPE_NAMES.get(t, t) for t in found)}"
            )
    return problems


# ---- per-graph policies -----------------------------------------------------------------------


def module_path(root, scope: str) -> list:
    """The modules a node's scope ("/blocks.0/self_attn/norm_q") names, from ``root`` down.

    The TorchScript exporter names each scope level by the module's attribute path relative to
    the nearest module whose forward was called, so a level may skip containers ("blocks.0" is
    ``model.blocks[0]`` when ``model``'s own forward was not called).
    """
    path, cur = [], root
    for part in [p for p in scope.split("/") if p]:
        found = None
        # a module reached twice through a method call gets a "_1", "_2"... suffix in later scopes
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            found = next(
                (
                    mod
                    for name, mod in cur.named_modules()
                    if name and (name == candidate or name.endswith("." + candidate))
                ),
                None,
            )
            if found is not None:
                break
        if found is None:
            return path
        path.append(found)
        cur = found
    return path


def module_policy(
    root, fp32_io, fp32_kinds: tuple = (), fp32_modules: tuple = (), all_fp32: bool = False
) -> GraphPolicy:
    """A GraphPolicy where a node computes in float32 if any module on its scope path is an
    instance of ``fp32_kinds`` or one of ``fp32_modules`` (or every node, with ``all_fp32``)."""
    ids = {id(m) for m in fp32_modules}
    cache: dict[str, bool] = {}

    def fp32_node(name: str) -> bool:
        if all_fp32:
            return True
        scope = name.rsplit("/", 1)[0]
        if scope not in cache:
            cache[scope] = any(isinstance(m, fp32_kinds) or id(m) in ids for m in module_path(root, scope))
        return cache[scope]

    return GraphPolicy(frozenset(fp32_io), fp32_node)


def graph_policies(dit, vae) -> dict:
    """The low-precision policy of every graph of a bundle (see the module docstring)."""
    import torch.nn as nn

    from rf_runtime.export.dit_graph import CacheUpdate, DiTStep, TextKV
    from rf_runtime.export.vae_graph import DecodeFirst, DecodeNext, FrameDecoder
    from rf_runtime.models import dit as dit_module
    from rf_runtime.models import vae as vae_module

    norms = (dit_module.RMSNorm, nn.LayerNorm, vae_module.RMSNorm)
    step = DiTStep(dit)
    vae_io = {"z", "frames"}
    return {
        "dit_step": module_policy(
            step,
            {
                "x",
                "eps",
                "t_freq",
                "sigma",
                "sigma_next",
                "key_mask",
                "cos_ctx",
                "sin_ctx",
                "cos_q",
                "sin_q",
                "x0",
                "x_next",
            },
            norms,
            (dit.time_embedding, dit.time_projection, step.sampler_update),
        ),
        "cache_update": module_policy(CacheUpdate(1), {"mix"}, all_fp32=True),
        "text_kv": module_policy(TextKV(dit), {"text_embeds"}, norms),
        "vae_decode_first": module_policy(DecodeFirst(FrameDecoder(vae)), vae_io, norms),  # as exported
        "vae_decode": module_policy(DecodeNext(FrameDecoder(vae)), vae_io, norms),
    }


def lower_file(src: str, dst: str, precision: str, policy: GraphPolicy) -> list[str]:
    """Lower the fp32 graph in ``src`` and write it to ``dst``; returns the external-data file names
    written beside it (one ``<dst>.data`` for a graph over protobuf's 2 GB, else none)."""
    lowered = lower_graph(onnx.load(src), precision, policy)  # the fp32 graph is freed on return
    data = save_onnx(lowered, dst, external=onnx_files.over_limit(lowered))
    if data:  # too large to check in memory
        _check(dst, precision)
    return data


def add_precision_variants(bundle_dir: str, dit, vae, precisions) -> dict:
    """Lower every fp32 graph ``<name>.onnx`` of ``bundle_dir`` to ``<name>.<precision>.onnx`` for each
    low precision asked for; returns the new ``files`` entries, keyed ``<name>@<precision>``."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError(
            f"unknown precision(s) {bad}: choose from {', '.join(PRECISIONS)} (e.g. --precision fp32,fp16)"
        )
    policies = graph_policies(dit, vae)
    files = {}
    for precision in precisions:
        if precision == "fp32":
            continue
        for name, policy in policies.items():
            path = f"{name}.{precision}.onnx"
            started = time.perf_counter()
            data = lower_file(
                os.path.join(bundle_dir, f"{name}.onnx"), os.path.join(bundle_dir, path), precision, policy
            )
            logger.info("lowered %s to %s in %.1f s", name, precision, time.perf_counter() - started)
            files[f"{name}@{precision}"] = {"path": path}
            files.update({f"{name}@{precision}_data": {"path": d} for d in data})
    return files
