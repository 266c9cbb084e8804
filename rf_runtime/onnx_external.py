"""Every external-data reference of an ONNX file, read from the protobuf wire format (no onnx needed).

An ONNX tensor can keep its bytes in another file: ``TensorProto.external_data`` holds
``location`` (a path relative to the .onnx), ``offset`` and ``length``. onnxruntime opens that
path when it creates a session, so a bundle must check every location before onnxruntime sees
the graph (``rf_runtime.bundle``). The runtime path has numpy and onnxruntime but not always
``onnx``, hence this reader: it walks only the messages that can hold tensors, by field number
(onnx.proto; the test checks them against onnx's own descriptors):

    ModelProto.graph (7), .training_info (20), .functions (25)
    TrainingInfoProto.initialization (1), .algorithm (2)
    GraphProto.node (1), .initializer (5), .sparse_initializer (15)
    NodeProto.attribute (5)            FunctionProto.node (7)
    AttributeProto.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23)
    SparseTensorProto.values (1), .indices (2)
    TensorProto.name (8), .external_data (13) -> StringStringEntryProto key (1), value (2)
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "function": {7: "node"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
MAX_DEPTH = 64  # graphs nested in attributes (If / Loop bodies); deeper is not a graph we made


class OnnxWireError(ValueError):
    """The file is not a well-formed protobuf message."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str  # the tensor's name
    entries: tuple[tuple[str, str], ...]  # every (key, value) of its external_data, in file order

    @property
    def locations(self) -> list[str]:
        return [v for k, v in self.entries if k == "location"]


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end:
            raise OnnxWireError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise OnnxWireError("varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, start, end) of every length-delimited field of the message in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise OnnxWireError("a field runs past the end of its message")
            yield field, i, i + n
            i += n
            continue
        else:
            raise OnnxWireError(f"unsupported wire type {wire}")
        if i > end:
            raise OnnxWireError("a field runs past the end of its message")


def _text(buf, s: int, e: int) -> str:
    return buf[s:e].decode("utf-8", "surrogateescape")


def _walk(buf, kind: str, start: int, end: int, out: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise OnnxWireError(f"messages nested more than {MAX_DEPTH} deep")
    if kind == "tensor":
        name, entries = "", []
        for f, s, e in _fields(buf, start, end):
            if f == 8:
                name = _text(buf, s, e)
            elif f == 13:
                key = value = ""
                for f2, s2, e2 in _fields(buf, s, e):
                    if f2 == 1:
                        key = _text(buf, s2, e2)
                    elif f2 == 2:
                        value = _text(buf, s2, e2)
                entries.append((key, value))
        if entries:
            out.append(ExternalRef(name, tuple(entries)))
        return
    children = _CHILDREN[kind]
    for f, s, e in _fields(buf, start, end):
        if f in children:
            _walk(buf, children[f], s, e, out, depth + 1)


def external_refs(path: str | os.PathLike) -> list[ExternalRef]:
    """Every tensor of the .onnx at ``path`` that names external data (initializers, constants in
    node attributes, sparse tensors, subgraphs, functions, training graphs). Raises OnnxWireError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OnnxWireError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            out: list[ExternalRef] = []
            _walk(m, "model", 0, size, out, 0)
            return out
