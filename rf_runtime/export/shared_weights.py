"""One weights file for the batched graphs of a bundle (``rf-export onnx --batch-sizes``).

The graphs of batch sizes 2, 4, ... hold the same weights as the batch-1 graphs; stored in each they
would multiply the bundle (which the wheel carries) by the number of sizes. ``share_weights`` moves
every tensor of at least 1 KiB of the given graphs into one external-data file, each distinct tensor
once (found by its bytes' sha256), so the DiT's weights are stored once for every batch size and the
VAE decoder's once for both of its graphs and every size. Large all-zero constants (the causal
decoder's zero padding of the first frame, folded per batch size by the exporter) become
``ConstantOfShape`` nodes: the same values, computed on load instead of stored.

The batch-1 graphs stay as they are (self-contained files), so bundles and tools that read them are
unchanged.
"""

from __future__ import annotations

import hashlib
import os

import onnx
from onnx import numpy_helper

from rf_runtime.export.onnx_files import EXTERNAL_THRESHOLD, constant_of_shape

ALIGN = 64  # byte alignment of each tensor in the data file


def zeros_as_constant_of_shape(model: onnx.ModelProto) -> int:
    """Replace every ``Constant`` node of at least 1 KiB: an all-zero one by a ``ConstantOfShape`` of
    the same shape and dtype, any other by an initializer of its output's name (which
    ``share_weights`` can then store once); returns how many were replaced."""
    replaced = 0
    nodes = list(model.graph.node)
    for index, node in enumerate(nodes):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        value = numpy_helper.to_array(node.attribute[0].t)
        if value.nbytes < EXTERNAL_THRESHOLD:
            continue
        if value.any():  # a folded weight: an initializer of the same name, so that it can be shared
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            nodes[index] = []
            replaced += 1
            continue
        nodes[index] = constant_of_shape(node.output[0], value.shape, value.dtype)
        replaced += 1
    if replaced:
        flat = []
        for n in nodes:
            flat.extend(n if isinstance(n, list) else [n])
        del model.graph.node[:]
        model.graph.node.extend(flat)
    return replaced


def share_weights(bundle_dir: str, graph_files: list[str], data_file: str) -> dict:
    """Rewrite the graphs ``graph_files`` (paths relative to ``bundle_dir``) so that their tensors of at
    least 1 KiB live in ``data_file`` (relative too), each distinct tensor stored once.

    Returns {"tensors": references rewritten, "stored": distinct tensors written, "bytes": data size}.
    """
    index: dict[tuple, tuple[int, int]] = {}  # (sha256, dtype, dims) -> (offset, length)
    data_path = os.path.join(bundle_dir, data_file)
    refs = 0
    with open(data_path, "wb") as data:
        for rel in graph_files:
            path = os.path.join(bundle_dir, rel)
            model = onnx.load(path)
            zeros_as_constant_of_shape(model)
            for tensor in model.graph.initializer:
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < EXTERNAL_THRESHOLD:
                    continue
                key = (hashlib.sha256(raw).hexdigest(), tensor.data_type, tuple(tensor.dims))
                if key not in index:
                    offset = data.tell()
                    offset += -offset % ALIGN
                    data.seek(offset)
                    data.write(raw)
                    index[key] = (offset, len(raw))
                offset, length = index[key]
                tensor.ClearField("float_data")
                tensor.ClearField("int64_data")
                tensor.ClearField("int32_data")
                tensor.ClearField("double_data")
                tensor.raw_data = b"\0"  # set_external_data needs the field; cleared right after
                onnx.external_data_helper.set_external_data(
                    tensor, os.path.relpath(data_path, os.path.dirname(path)), offset, length
                )
                tensor.ClearField("raw_data")
                refs += 1
            onnx.save(model, path)
        size = data.tell()
    return {"tensors": refs, "stored": len(index), "bytes": size}
