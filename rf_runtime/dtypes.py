"""The one table of tensor element types: the names the manifest, the runners and the CLIs use
("float32", "float16", "bfloat16", ...), and their importers for each framework (as Polygraphy's
``DataType`` has one table with an importer per framework). numpy only; torch on request."""

from __future__ import annotations

import numpy as np

# name -> numpy dtype (bfloat16 has no numpy dtype: it lives in device buffers only)
NUMPY = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
# bytes per element; bfloat16 and the 8 / 4-bit float and int4 types have no numpy dtype (bfloat16 is
# staged as its bit patterns by the TensorRT runner, the others are device-only); int4 and
# float4_e2m1fn pack two elements in a byte (see nbytes)
ITEMSIZE = {
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "int4": 0.5,
    "float4_e2m1fn": 0.5,
    **{k: np.dtype(v).itemsize for k, v in NUMPY.items()},
}
NAMES = tuple(ITEMSIZE)
FLOAT = ("float32", "float16", "bfloat16")
# ONNX TensorProto element type -> name
ONNX = {
    1: "float32",
    10: "float16",
    16: "bfloat16",
    7: "int64",
    6: "int32",
    3: "int8",
    2: "uint8",
    9: "bool",
    17: "float8_e4m3fn",
    22: "int4",
    23: "float4_e2m1fn",
}
# onnxruntime's type strings -> name
ONNXRUNTIME = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def nbytes(dtype: str, count: int) -> int:
    """Bytes of ``count`` elements of ``dtype`` (4-bit types packed two to a byte, rounded up)."""
    return (count + 1) // 2 if ITEMSIZE[dtype] < 1 else count * int(ITEMSIZE[dtype])


def torch_dtypes() -> dict:
    """name -> torch dtype (imports torch)."""
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }


def torch_dtype(name: str):
    """The torch dtype of a name ("float32", "bfloat16", ...)."""
    table = torch_dtypes()
    if name not in table:
        from rf_runtime.errors import ConfigError

        raise ConfigError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]
