"""A bundle as TensorRT's ONNX parser would see it, checked without TensorRT (graphs of any size).

``check_bundle(bundle_dir, matrix_csv)`` loads the bundle as the runtime does (``Bundle.load``: every
file's size and sha256, every external-data location inside the bundle and listed as the graph's
``external_data``, the manifest's IO equal to each graph's) and then, for each graph:

* every op is marked supported in the parser's support matrix (TensorRT 10's ``operators.md`` as a
  CSV: operator, supported, types) with a listed type for every tensor it reads or writes;
* every graph input and output has a static shape;
* it is strongly typed (``export.precision.check_strongly_typed``: every value typed, no node mixing
  float types), which a ``STRONGLY_TYPED`` network needs: no precision is left to the builder.

The graphs are read without their weights and typed by shape inference from the file, so a 5.7 GB
graph costs what its structure costs. Two readings of the matrix, as in its tests: a comparison's
BOOL output is not looked up (its listed types are its inputs'), and the CSV's ``INF64`` typo for
ConstantOfShape reads as INT64.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from rf_runtime.export.precision import check_strongly_typed, typed_graph

CSV_TYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8",
}
COMPARISONS = ("Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal", "IsNaN")


@dataclass
class GraphView:
    name: str
    nodes: int
    ops: Counter
    external_tensors: int  # tensors whose bytes are in the graph's data file
    external_bytes: int
    inline_bytes: int  # tensor bytes inside the .onnx itself
    problems: list[str] = field(default_factory=list)


def read_matrix(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["operator"]: r for r in csv.DictReader(f)}


def op_problems(model_or_path, matrix: dict[str, dict]) -> list[str]:
    """Ops or tensor types the parser's matrix does not list, and graph IO without a static shape."""
    g, types = typed_graph(model_or_path)
    problems = []
    for v in (*g.input, *g.output):
        dims = v.type.tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") for d in dims):
            problems.append(f"{v.name} has a dynamic shape")
    for node in g.node:
        row = matrix.get(node.op_type)
        if row is None or row["supported"] != "Y":
            problems.append(f"{node.name}: {node.op_type} is not supported")
            continue
        allowed = {t.strip().replace("INF64", "INT64") for t in row["types"].split(",")}
        values = [i for i in node.input if i] + ([] if node.op_type in COMPARISONS else list(node.output))
        for value in values:
            if CSV_TYPES.get(types.get(value)) not in allowed:
                problems.append(
                    f"{node.name} ({node.op_type}): {value} has type {types.get(value)}, not in {allowed}"
                )
    return problems


def _tensor_layout(path: str) -> tuple[int, int, int]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(path, load_external_data=False)
    ext = n_ext = inline = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            n_ext += 1
            ext += int(ExternalDataInfo(t).length or 0)
        else:
            inline += len(t.raw_data)
    return n_ext, ext, inline


def check_bundle(bundle_dir: str, matrix_csv: str) -> list[GraphView]:
    """Every graph of the bundle as TensorRT would parse it (see the module docstring); raises
    BundleError where ``Bundle.load`` would."""
    from rf_runtime.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    matrix = read_matrix(matrix_csv)
    views = []
    for name in sorted(bundle.graphs):
        path = bundle.graph_file(name)
        g = onnx.load(path, load_external_data=False).graph
        view = GraphView(name, len(g.node), Counter(n.op_type for n in g.node), *_tensor_layout(path))
        view.problems = op_problems(path, matrix) + check_strongly_typed(path)
        views.append(view)
    return views
