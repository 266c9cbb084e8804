"""The one table of tensor element types: the names the manifest, the runners and the CLIs use
("float32", "float16", "bfloat16", ...), and their importers for each framework (as Polygraphy's
``DataType`` has one table with an importer per framework). numpy only; torch on request."""

from __future__ import annotations

import numpy as np

# name -> numpy dtype (bfloat16 has no numpy dtype: it lives in device buffers only)
NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
         "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
ITEMSIZE = {"bfloat16": 2, **{k: np.dtype(v).itemsize for k, v in NUMPY.items()}}
NAMES = tuple(ITEMSIZE)
FLOAT = ("float32", "float16", "bfloat16")
# ONNX TensorProto element type -> name
ONNX = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}
# onnxruntime's type strings -> name
ONNXRUNTIME = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool"}


def torch_dtypes() -> dict:
    """name -> torch dtype (imports torch)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
            "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def torch_dtype(name: str):
    """The torch dtype of a name ("float32", "bfloat16", ...)."""
    table = torch_dtypes()
    if name not in table:
        from rf_runtime.errors import ConfigError

        raise ConfigError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]
