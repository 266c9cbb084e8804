"""PyTorch runner: a torch module on named tensors. The reference the other runners are held to
(the runner contract test, ``rf-export verify``); not part of the torch-free runtime path.

The module is called with the graph's inputs as keyword arguments and returns its outputs in
graph order (a tensor, a tuple, or a dict keyed by output name). Outputs are copied into the
binding's output buffers, so the same Binding / Buffer protocol holds as for the other runners.
"""

from __future__ import annotations

import numpy as np

from rf_runtime.dtypes import torch_dtypes
from rf_runtime.errors import require
from rf_runtime.runners.base import ITEMSIZE, Binding, Buffer, GraphSpec, Runner, RunnerError


class TorchRunner(Runner):
    """Runs ``module`` (a torch.nn.Module or any callable on tensors) for the graph ``graph``."""

    def __init__(self, module, graph: GraphSpec, *, device: str = "cpu", name: str | None = None):
        if graph is None:
            raise RunnerError(
                "TorchRunner needs the graph's IO (a GraphSpec): a torch module carries no tensor names"
            )
        super().__init__(graph, name)
        self.module = module
        self.device = device
        self.torch = None

    def activate_impl(self) -> None:
        self.torch = require("torch", "torch")
        self._dtypes = torch_dtypes()
        if hasattr(self.module, "eval"):
            self.module.eval()

    def deactivate_impl(self) -> None:
        self.torch = None

    def allocate_impl(self, shape, dtype) -> Buffer:
        tensor = self.torch.zeros(shape, dtype=self._dtypes[dtype], device=self.device)
        host = tensor.numpy() if tensor.device.type == "cpu" and dtype != "bfloat16" else None
        return Buffer(shape, dtype, tensor.device.type, tensor.data_ptr(), host, tensor)

    def _tensor(self, buffer: Buffer):
        if buffer.base is None:
            return buffer.owner
        offset = (buffer.ptr - buffer.base.ptr) // ITEMSIZE[buffer.dtype]
        n = int(np.prod(buffer.shape, dtype=np.int64))
        return buffer.base.owner.reshape(-1)[offset : offset + n].view(buffer.shape)

    def write_impl(self, buffer: Buffer, array: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(array))
        self._tensor(buffer).copy_(src)

    def read_impl(self, buffer: Buffer) -> np.ndarray:
        if buffer.host is not None:
            return buffer.host
        return self._tensor(buffer).float().cpu().numpy()

    def bind_impl(self, binding: Binding) -> None:
        binding.impl = {name: self._tensor(buf) for name, buf in binding.buffers.items()}

    def rebind_impl(self, binding: Binding, name: str) -> None:
        binding.impl[name] = self._tensor(binding.buffers[name])

    def run_impl(self, binding: Binding) -> None:
        tensors = binding.impl
        with self.torch.no_grad():
            result = self.module(**{spec.name: tensors[spec.name] for spec in self.graph.inputs})
        if isinstance(result, dict):
            result = [result[spec.name] for spec in self.graph.outputs]
        elif not isinstance(result, (tuple, list)):
            result = [result]
        if len(result) != len(self.graph.outputs):
            raise RunnerError(
                f"{self.name}: the module returned {len(result)} outputs, the graph has "
                f"{len(self.graph.outputs)} ({self.graph.output_names()})"
            )
        for spec, value in zip(self.graph.outputs, result):
            if tuple(value.shape) != spec.shape or value.dtype != self._dtypes[spec.dtype]:
                raise RunnerError(
                    f"{self.name}: the module's output {spec.name!r} is {list(value.shape)} "
                    f"{value.dtype}, the graph declares {list(spec.shape)} {spec.dtype}"
                )
            tensors[spec.name].copy_(value)
