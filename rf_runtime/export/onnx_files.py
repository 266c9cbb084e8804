"""Writing ONNX graphs of any size: in one piece, or with their weights in one external-data file.

Protobuf cannot serialize a message over 2 GB, so a large graph keeps its tensors in a separate
file; torch's exporter then writes one file per tensor. ``save_onnx`` always writes at most one
data file, named ``<graph file>.data``, beside the graph, so a bundle lists a known set of files.
"""

from __future__ import annotations

import contextlib
import os

import onnx

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto this large cannot be serialized in one piece
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file


@contextlib.contextmanager
def traced_in_scratch(module, args, path: str, input_names, output_names, opset: int):
    """``torch.onnx.export`` (TorchScript, constants folded) of ``module`` on ``args`` into a scratch
    folder beside ``path``; yields (the raw graph's path, the folder), removed afterwards. Beside, so
    that the byte copies out of it stay on one file system; apart, because torch writes a graph over
    2 GB as one file per tensor next to it, which the callers then gather (``save_streamed``) or read."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(
        prefix=".rf-export-", dir=os.path.dirname(os.path.abspath(path))
    ) as scratch:
        raw = os.path.join(scratch, os.path.basename(path))
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                raw,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        yield raw, scratch


def over_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large for one protobuf message. Not ``model.ByteSize()``: protobuf
    refuses to compute that for a message over 2 GB (EncodeError), the very case to detect. Counted
    instead: the bytes of every tensor held in memory, plus 64 MiB for the graph's structure."""
    from onnx.external_data_helper import uses_external_data

    tensors = sum(len(t.raw_data) for t in _model_tensors(model) if not uses_external_data(t))
    return tensors + (64 << 20) >= PROTOBUF_LIMIT


def save_onnx(model: onnx.ModelProto, path: str, external: bool | None = None) -> list[str]:
    """Save ``model`` (all tensor data in memory) to ``path``; returns the data files written beside it.

    external: True always writes the weights to ``<name>.data``; None does so only when the model
    is over protobuf's limit; False never (and fails for a model over the limit).
    Tensors under 1 KiB (shapes, axes, scalars) stay in the graph, where runtimes read them on load.
    """
    if external is None:
        external = over_limit(model)
    if not external:
        onnx.save(model, path)
        return []
    data = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), data)
    if os.path.exists(data_path):  # onnx appends to an existing data file
        os.remove(data_path)
    onnx.external_data_helper.convert_model_to_external_data(
        model,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=EXTERNAL_THRESHOLD,
        convert_attribute=True,
    )
    onnx.save(model, path)
    from rf_runtime.files import give_default_permissions

    give_default_permissions(data_path)  # onnx creates the data file owner-only (0600)
    return [data]


def _model_tensors(model: onnx.ModelProto):
    """Every tensor of the main graph that can carry weights: initializers and Constant node values."""
    g = model.graph
    yield from g.initializer
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


ALIGNMENT = 4096  # each tensor's offset in the data file (onnxruntime can then map it page-aligned)
COPY_CHUNK = 64 << 20


def save_streamed(src: str, path: str) -> list[str]:
    """Rewrite the ONNX file ``src`` (its weights inline or in any number of external files, as torch's
    exporter writes a > 2 GB graph: one file per tensor) as ``path`` with every tensor of at least
    1 KiB in one data file ``<name>.data``, copying the bytes file to file: the weights are never all
    in memory (at most one tensor, for one kept inline in ``src``). Returns ``[<name>.data]``.
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(src, load_external_data=False)
    src_dir = os.path.dirname(os.path.abspath(src))
    data = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), data)
    with open(data_path, "wb") as out:
        for tensor in _model_tensors(model):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                length = info.length or os.path.getsize(os.path.join(src_dir, info.location)) - (
                    info.offset or 0
                )
                if length < EXTERNAL_THRESHOLD:
                    continue  # torch writes only large tensors apart; a small one stays where it is
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                info, length = None, len(tensor.raw_data)
            else:
                continue  # small, or held in a typed field (float_data...): stays in the graph
            offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
            out.seek(offset)
            if info is None:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                with open(os.path.join(src_dir, info.location), "rb") as f:
                    f.seek(info.offset or 0)
                    left = length
                    while left:
                        block = f.read(min(COPY_CHUNK, left))
                        if not block:
                            raise OSError(f"{info.location}: {left} bytes missing for tensor {tensor.name}")
                        out.write(block)
                        left -= len(block)
                del tensor.external_data[:]
            for key, value in (("location", data), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, path)
    return [data]


def constant_of_shape(name: str, shape, dtype) -> list[onnx.NodeProto]:
    """The nodes that make the all-zero tensor ``name`` of ``shape`` and numpy ``dtype`` on load
    (a Constant shape and a ConstantOfShape) instead of storing it."""
    import numpy as np
    from onnx import helper, numpy_helper

    shape_name = f"{name}__shape"
    return [
        helper.make_node(
            "Constant", [], [shape_name], value=numpy_helper.from_array(np.array(shape, np.int64), shape_name)
        ),
        helper.make_node(
            "ConstantOfShape", [shape_name], [name], value=numpy_helper.from_array(np.zeros(1, dtype))
        ),
    ]


def zero_constants_to_fills(model: onnx.ModelProto, base_dir: str) -> int:
    """Replace every ``Constant`` node whose value is all zeros and at least 1 KiB by a ConstantOfShape
    (``constant_of_shape``), reading each value (inline or in an external file under ``base_dir``)
    one at a time; in place, returns how many. The TorchScript exporter stores zeros it can compute
    as data: the streaming VAE's first-frame cache slots, 3.5 GB at 480x832 for the Wan VAE."""
    import numpy as np
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    nodes, replaced = [], 0
    for node in model.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is None or node.attribute[0].name != "value" or value.data_type == onnx.TensorProto.STRING:
            nodes.append(node)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.data_type)
        if uses_external_data(value):
            info = ExternalDataInfo(value)
            with open(os.path.join(base_dir, info.location), "rb") as f:
                f.seek(info.offset or 0)
                raw = f.read(info.length) if info.length else f.read()
        else:
            raw = value.raw_data
        if len(raw) < EXTERNAL_THRESHOLD or np.frombuffer(raw, dtype).any():
            nodes.append(node)
            continue
        nodes.extend(constant_of_shape(node.output[0], list(value.dims), dtype))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced
