"""onnxruntime runner: CPU or CUDA execution provider, IOBinding with preallocated buffers.

Every input and output is bound by address (``IOBinding.bind_input`` / ``bind_output`` with a
buffer pointer), once per binding; ``Binding.set`` rebinds one name by address, which moves no
data. Outputs are written straight into the bound buffers. onnxruntime cannot alias an input with
an output, so state that a graph updates (cache in -> cache out) lives in two buffers that are
swapped between calls (the base class refuses an aliased binding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from rf_runtime.dtypes import ONNXRUNTIME
from rf_runtime.errors import require
from rf_runtime.runners.base import (
    DTYPES,
    Binding,
    Buffer,
    GraphSpec,
    Runner,
    RunnerError,
    TensorSpec,
    host_buffer,
    write_host,
)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_graph_spec(session, name: str) -> GraphSpec:
    """The IO of an onnxruntime session as a GraphSpec (every dimension must be static)."""

    def spec(arg):
        if any(not isinstance(d, int) for d in arg.shape):
            raise RunnerError(
                f"graph {name}: {arg.name} has a dynamic shape {arg.shape}; bundles hold static-shape "
                "graphs: re-export it"
            )
        return TensorSpec(arg.name, tuple(arg.shape), ONNXRUNTIME.get(arg.type, arg.type))

    return GraphSpec(
        name, tuple(spec(a) for a in session.get_inputs()), tuple(spec(a) for a in session.get_outputs())
    )


@dataclass(frozen=True)
class CpuThreads:
    """How an onnxruntime CPU session uses the cores.

    intra_op: threads that run one graph call (onnxruntime's ``intra_op_num_threads``); 1 runs every
        op on the calling thread, so several streams calling one session from their own threads run
        in parallel without oversubscribing the cores.
    spinning: idle intra-op threads spin between ops instead of sleeping (onnxruntime's default;
        lower latency on an idle machine, but it burns the cores other streams and processes need).
    """

    intra_op: int = 1
    spinning: bool = False

    def __post_init__(self):
        if not isinstance(self.intra_op, int) or isinstance(self.intra_op, bool) or self.intra_op < 1:
            raise RunnerError(f"intra_op threads must be a positive integer, got {self.intra_op!r}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX graph through onnxruntime on ``device`` "cpu" or "cuda".

    graph: the IO the caller expects (from the bundle manifest); checked against the session's
        own metadata at activate(). None: take it from the session.
    threads: ``CpuThreads`` (or an int: that many intra-op threads, no spinning); None leaves
        onnxruntime's own default (one thread per core, spinning).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        graph: GraphSpec | None = None,
        *,
        device: str = "cpu",
        name: str | None = None,
        threads: CpuThreads | int | None = None,
    ):
        if device not in PROVIDERS:
            raise RunnerError(f"device must be one of {sorted(PROVIDERS)}, got {device!r}")
        super().__init__(graph, name or (graph.name if graph else os.path.basename(os.fspath(path))))
        self.path = os.fspath(path)
        self.device = device
        self.threads = CpuThreads(threads) if isinstance(threads, int) else threads
        self.session = None

    def activate_impl(self) -> None:
        ort = require("onnxruntime", "cpu" if self.device == "cpu" else "gpu")
        provider = PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise RunnerError(
                f"onnxruntime has no {provider} here (available: {ort.get_available_providers()}): "
                "install onnxruntime-gpu (pip install 'rf_runtime[gpu]') on a machine with a CUDA "
                "GPU, or use device='cpu'"
            )
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads.intra_op
            options.inter_op_num_threads = 1
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if self.threads.spinning else "0"
            )
        self.session = ort.InferenceSession(self.path, options, providers=[provider])
        self._run_options = ort.RunOptions()  # one object: without it every run keeps a few bytes

    def loaded_graph_impl(self) -> GraphSpec:
        return session_graph_spec(self.session, self.name)

    def deactivate_impl(self) -> None:
        self.session = None

    def allocate_impl(self, shape, dtype) -> Buffer:
        if self.device == "cpu":
            return host_buffer(shape, dtype)
        ort = require("onnxruntime", "gpu")
        if dtype not in DTYPES:
            raise RunnerError(
                f"onnxruntime buffers of dtype {dtype} are not supported; use float32 or float16 graphs"
            )
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, DTYPES[dtype], "cuda", 0)
        # new CUDA memory holds whatever was there: zero it, as host buffers are, so that a masked
        # (never written) part of a KV or VAE cache is 0 and not NaN (0 x NaN = NaN through the mask)
        value.update_inplace(np.zeros(shape, DTYPES[dtype]))
        return Buffer(shape, dtype, "cuda", value.data_ptr(), None, value)

    def write_impl(self, buffer: Buffer, array: np.ndarray) -> None:
        if buffer.host is not None:
            write_host(buffer, array)
        elif buffer.base is None:
            buffer.owner.update_inplace(np.ascontiguousarray(array, DTYPES[buffer.dtype]))
        else:
            raise RunnerError(
                "writing into a view of a device buffer is not supported: write the whole buffer"
            )

    def read_impl(self, buffer: Buffer) -> np.ndarray:
        if buffer.host is not None:
            return buffer.host
        if buffer.base is not None:
            raise RunnerError("reading a view of a device buffer is not supported: read the whole buffer")
        return buffer.owner.numpy()  # device -> host copy

    def _bind(self, io, name: str, buffer: Buffer, is_input: bool) -> None:
        bind = io.bind_input if is_input else io.bind_output
        bind(name, buffer.device, 0, DTYPES[buffer.dtype], buffer.shape, buffer.ptr)

    def bind_impl(self, binding: Binding) -> None:
        io = self.session.io_binding()
        for spec in self.graph.inputs:
            self._bind(io, spec.name, binding.buffers[spec.name], True)
        for spec in self.graph.outputs:
            self._bind(io, spec.name, binding.buffers[spec.name], False)
        binding.impl = io

    def rebind_impl(self, binding: Binding, name: str) -> None:
        self._bind(binding.impl, name, binding.buffers[name], name in self._input_names)

    def run_impl(self, binding: Binding) -> None:
        self.session.run_with_iobinding(binding.impl, self._run_options)
