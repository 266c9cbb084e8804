"""TensorRT runner (TensorRT 10 / 11 Python API, cuda-python for memory, streams and CUDA graphs).

A serialized plan is deserialized at activate(); every Binding gets its own execution context
(several streams can share one engine) with ``set_tensor_address`` for every I/O tensor, set once
and changed only by ``Binding.set``. ``run`` calls ``execute_async_v3`` on the runner's CUDA
stream. With ``cuda_graph=True`` the first run of a binding in a given configuration is captured
into a CUDA graph and later runs replay it; a captured graph is keyed on the tensor shapes and
the addresses it was captured with, so rebinding a tensor selects (or captures) another graph and
never replays one with stale addresses.

``tensorrt`` and ``cuda-python`` are imported inside activate(): importing this module never
needs them, and a missing one raises MissingDependencyError naming ``rf_runtime[gpu]``.
"""

from __future__ import annotations

import os

import numpy as np

from rf_runtime.errors import require
from rf_runtime.runners.base import DTYPES, Binding, Buffer, GraphSpec, Runner, RunnerError, TensorSpec


def import_cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime`` from 12.6 on, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        cudart = require("cuda.cudart", "gpu")
    return cudart


def check_cuda(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RunnerError(f"CUDA call {what} failed with {err}: is a CUDA GPU visible and the driver working?")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def trt_dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64",
             trt.int32: "int32", trt.int8: "int8", trt.bool: "bool", trt.uint8: "uint8"}
    if dtype not in names:
        raise RunnerError(f"TensorRT dtype {dtype} is not supported by this runner")
    return names[dtype]


def engine_graph_spec(trt, engine, name: str) -> GraphSpec:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        shape = tuple(engine.get_tensor_shape(tname))
        if any(d < 0 for d in shape):
            raise RunnerError(f"engine {name}: {tname} has a dynamic shape {shape}; bundles hold static-shape "
                              "engines: rebuild with `rf-export trt BUNDLE`")
        spec = TensorSpec(tname, shape, trt_dtype_name(trt, engine.get_tensor_dtype(tname)))
        (inputs if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return GraphSpec(name, tuple(inputs), tuple(outputs))


class _DeviceMemory:
    """One cudaMalloc allocation, freed with its last reference."""

    def __init__(self, cudart, nbytes: int):
        self.cudart = cudart
        self.ptr = int(check_cuda(cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        check_cuda(cudart.cudaMemset(self.ptr, 0, max(nbytes, 1)), "cudaMemset")

    def __del__(self):
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (``.plan``) on the current CUDA device.

    graph: the IO the caller expects (from the bundle manifest); checked against the engine's.
    cuda_graph: capture each binding's first run per (shapes, addresses) into a CUDA graph.
    """

    device = "cuda"

    def __init__(self, plan_path: str | os.PathLike, graph: GraphSpec | None = None, *, cuda_graph: bool = False,
                 name: str | None = None):
        super().__init__(graph, name or (graph.name if graph else os.path.basename(os.fspath(plan_path))))
        self.plan_path = os.fspath(plan_path)
        self.cuda_graph = cuda_graph
        self.engine = None
        self._staging: dict[int, np.ndarray] = {}

    def activate_impl(self) -> None:
        trt = require("tensorrt", "gpu")
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(self.plan_path, "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise RunnerError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path}: it was built by "
                              "another TensorRT version or for another GPU; rebuild with `rf-export trt BUNDLE`")
        actual = engine_graph_spec(trt, engine, self.name)
        if self.graph is None:
            self.graph = actual
        else:
            problems = self.graph.compare(actual)
            if problems:
                raise RunnerError(f"{self.plan_path}: the engine does not match its declared IO: "
                                  + "; ".join(problems) + "; rebuild with `rf-export trt BUNDLE`")
        self.engine = engine
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = int(self.stream)

    def deactivate_impl(self) -> None:
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.cudart.cudaStreamDestroy(self.stream)
        self.engine = None
        self._staging.clear()

    def allocate_impl(self, shape, dtype) -> Buffer:
        n = int(np.prod(shape, dtype=np.int64))
        memory = _DeviceMemory(self.cudart, n * np.dtype(DTYPES.get(dtype, np.float16)).itemsize)
        return Buffer(shape, dtype, "cuda", memory.ptr, None, memory)

    def _host(self, buffer: Buffer) -> np.ndarray:
        """A host staging array per buffer, allocated on first use and reused (no steady-state allocation)."""
        if buffer.dtype not in DTYPES:
            raise RunnerError(f"{buffer.dtype} buffers cannot be read or written from the host; feed float32 or "
                              "float16 tensors")
        host = self._staging.get(buffer.ptr)
        if host is None or host.shape != buffer.shape:
            host = self._staging[buffer.ptr] = np.empty(buffer.shape, DTYPES[buffer.dtype])
        return host

    def write_impl(self, buffer: Buffer, array: np.ndarray) -> None:
        host = self._host(buffer)
        np.copyto(host, array, casting="same_kind")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.cudart.cudaMemcpyAsync(buffer.ptr, host.ctypes.data, host.nbytes, kind, self.stream),
                   "cudaMemcpyAsync")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def read_impl(self, buffer: Buffer) -> np.ndarray:
        host = self._host(buffer)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check_cuda(self.cudart.cudaMemcpyAsync(host.ctypes.data, buffer.ptr, host.nbytes, kind, self.stream),
                   "cudaMemcpyAsync")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host

    def bind_impl(self, binding: Binding) -> None:
        context = self.engine.create_execution_context()
        for name, buffer in binding.buffers.items():
            if not context.set_tensor_address(name, buffer.ptr):
                raise RunnerError(f"{self.name}: TensorRT refused the address of {name!r}")
        binding.impl = {"context": context, "graphs": {}}

    def rebind_impl(self, binding: Binding, name: str) -> None:
        if not binding.impl["context"].set_tensor_address(name, binding.buffers[name].ptr):
            raise RunnerError(f"{self.name}: TensorRT refused the address of {name!r}")

    def graph_key(self, binding: Binding) -> tuple:
        """What a captured CUDA graph depends on: every tensor's shape and address."""
        return tuple((name, b.shape, b.ptr) for name, b in binding.buffers.items())

    def run_impl(self, binding: Binding) -> None:
        context = binding.impl["context"]
        if not self.cuda_graph:
            if not context.execute_async_v3(self._stream_handle):
                raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        else:
            graphs = binding.impl["graphs"]
            key = self.graph_key(binding)
            exe = graphs.get(key)
            if exe is None:
                exe = graphs[key] = self._capture(context)
            check_cuda(self.cudart.cudaGraphLaunch(exe, self.stream), "cudaGraphLaunch")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _capture(self, context):
        cudart = self.cudart
        # one plain run first: TensorRT finishes lazy initialisation outside the capture
        if not context.execute_async_v3(self._stream_handle):
            raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        ok = context.execute_async_v3(self._stream_handle)
        graph = check_cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        if not ok:
            raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed during CUDA graph capture")
        exe = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        cudart.cudaGraphDestroy(graph)  # the instantiated graph does not need it
        return exe


def current_gpu() -> tuple[str, str] | None:
    """(compute capability "9.0", device name) of CUDA device 0, or None without cuda-python or a GPU."""
    try:
        cudart = import_cudart()
        props = check_cuda(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    except (ImportError, RunnerError):
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{props.major}.{props.minor}", name.rstrip("\x00")
