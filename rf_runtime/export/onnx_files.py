"""Writing ONNX graphs of any size: in one piece, or with their weights in one external-data file.

Protobuf cannot serialize a message over 2 GB, so a large graph keeps its tensors in a separate
file; torch's exporter then writes one file per tensor. ``save_onnx`` always writes at most one
data file, named ``<graph file>.data``, beside the graph, so a bundle lists a known set of files.
"""

from __future__ import annotations

import os

import onnx

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto this large cannot be serialized in one piece
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file


def save_onnx(model: onnx.ModelProto, path: str, external: bool | None = None) -> list[str]:
    """Save ``model`` (all tensor data in memory) to ``path``; returns the data files written beside it.

    external: True always writes the weights to ``<name>.data``; None does so only when the model
    is over protobuf's limit; False never (and fails for a model over the limit).
    Tensors under 1 KiB (shapes, axes, scalars) stay in the graph, where runtimes read them on load.
    """
    if external is None:
        external = model.ByteSize() >= PROTOBUF_LIMIT
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
    return [data]
