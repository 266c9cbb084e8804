"""TensorRT runner (TensorRT 10 / 11 Python API, cuda-python for memory, streams and CUDA graphs).

A serialized plan is deserialized at activate() on the runner's CUDA device (``device_id``, made
current with ``cudaSetDevice`` in every public call: the current device is per thread). Every
Binding gets its own execution context (several streams can share one engine) with
``set_tensor_address`` for every I/O tensor, set once and changed only by ``Binding.set``. The
contexts are created with ``USER_MANAGED`` allocation and all use one scratch (activation) buffer
per runner, sized by the engine (as NVIDIA's demo/Diffusion does): a runner's runs never overlap
(one stream, one lock, a synchronize after each run), so they can share it, and many bindings cost
no activation memory each.

``run`` calls ``execute_async_v3`` on the runner's CUDA stream. With ``cuda_graph=True`` the first
run of a binding in a given configuration is captured into a CUDA graph and later runs replay it;
a captured graph is keyed on the tensor shapes and the addresses it was captured with, so
rebinding a tensor selects (or captures) another graph and never replays one with stale addresses.
At most ``max_graphs`` graphs are kept per binding (least recently used evicted and destroyed);
a binding's graphs are destroyed when it is garbage collected and at deactivate().

Host reads and writes go through page-locked staging arrays (so the copies are truly
asynchronous on the runner's stream), one per (device address, dtype, shape), reused. bfloat16
buffers are staged as their 16-bit patterns: written from float32 (rounded to nearest even) or
from ml_dtypes.bfloat16 arrays, read back as float32 (exact). One lock per runner serialises the
stream: two threads may share one runner (rf-serve does).

``tensorrt`` and ``cuda-python`` are imported inside activate(): importing this module never
needs them, and a missing one raises MissingDependencyError naming ``rf_runtime[gpu]``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import weakref

import numpy as np

from rf_runtime.errors import require
from rf_runtime.runners.base import (
    DTYPES,
    Binding,
    Buffer,
    GraphSpec,
    Runner,
    RunnerError,
    TensorSpec,
    dtype_nbytes,
)

log = logging.getLogger("rf_runtime")

ALIGNMENT = 256  # bytes: IExecutionContext::setTensorAddress needs tensor addresses aligned to 256
MAX_GRAPHS = 64  # CUDA graphs kept per binding (a stream's distinct step / table / ping-pong configurations)

# TensorRT DataType member name -> the manifest's dtype name (members missing in older versions are skipped)
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
    "INT4": "int4",
    "FP4": "float4_e2m1fn",
}


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
        raise RunnerError(
            f"CUDA call {what} failed with {err}: is a CUDA GPU visible and the driver working?"
        )
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def trt_dtype_name(trt, dtype) -> str:
    for member, name in TRT_DTYPES.items():
        if getattr(trt.DataType, member, None) == dtype:
            return name
    raise RunnerError(
        f"TensorRT dtype {dtype} is not supported by this runner; it knows {sorted(TRT_DTYPES)}"
    )


def engine_graph_spec(trt, engine, name: str) -> GraphSpec:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        shape = tuple(engine.get_tensor_shape(tname))
        if any(d < 0 for d in shape):
            raise RunnerError(
                f"engine {name}: {tname} has a dynamic shape {shape}; bundles hold static-shape "
                "engines: rebuild with `rf-export trt BUNDLE`"
            )
        spec = TensorSpec(tname, shape, trt_dtype_name(trt, engine.get_tensor_dtype(tname)))
        (inputs if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return GraphSpec(name, tuple(inputs), tuple(outputs))


def set_device(cudart, device_id: int) -> None:
    check_cuda(cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


class _DeviceMemory:
    """One cudaMalloc allocation (zeroed), freed with its last reference."""

    def __init__(self, cudart, nbytes: int):
        self.cudart = cudart
        self.ptr = 0
        self.ptr = int(check_cuda(cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        check_cuda(cudart.cudaMemset(self.ptr, 0, max(nbytes, 1)), "cudaMemset")

    def __del__(self):
        if self.ptr:
            self.cudart.cudaFree(self.ptr)  # nothing to raise to in a finalizer
            self.ptr = 0


class _PinnedMemory:
    """One cudaMallocHost (page-locked) allocation seen as a numpy array; freed with its last reference."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype):
        self.cudart = cudart
        self.ptr = 0
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * np.dtype(dtype).itemsize, 1)
        self.ptr = int(check_cuda(cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype, count).reshape(shape)

    def __del__(self):
        if self.ptr:
            self.array = None
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


def _destroy_graphs(cudart, graphs: dict) -> None:
    """Destroy every instantiated CUDA graph in ``graphs`` (a binding's cache) and empty it."""
    while graphs:
        _, exe = graphs.popitem()
        cudart.cudaGraphExecDestroy(exe)  # also called from a finalizer: nothing to raise to


def float32_to_bf16_bits(array: np.ndarray, out: np.ndarray) -> None:
    """Round float32 values to bfloat16 (nearest even), writing the 16-bit patterns into ``out`` (uint16)."""
    f = np.ascontiguousarray(array, np.float32)
    bits = f.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    rounded[np.isnan(f)] = 0x7FC0  # a quiet NaN (rounding could carry a NaN's low bits into infinity)
    np.copyto(out, rounded.reshape(out.shape), casting="unsafe")


def bf16_bits_to_float32(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 patterns (uint16) -> float32 values, exactly, into ``out`` (no allocation)."""
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="unsafe")
    np.left_shift(wide, 16, out=wide)
    return out


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (``.plan``) on CUDA device ``device_id``.

    graph: the IO the caller expects (from the bundle manifest); checked against the engine's.
    cuda_graph: capture each binding's first run per (shapes, addresses) into a CUDA graph.
    max_graphs: CUDA graphs kept per binding (least recently used destroyed beyond it).
    """

    rebuild = "rebuild with `rf-export trt BUNDLE`"

    device = "cuda"

    def __init__(
        self,
        plan_path: str | os.PathLike,
        graph: GraphSpec | None = None,
        *,
        cuda_graph: bool = False,
        name: str | None = None,
        device_id: int = 0,
        max_graphs: int = MAX_GRAPHS,
    ):
        super().__init__(graph, name or (graph.name if graph else os.path.basename(os.fspath(plan_path))))
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise RunnerError(
                f"max_graphs must be a positive number of CUDA graphs per binding, got {max_graphs!r}"
            )
        self.plan_path = os.fspath(plan_path)
        self.cuda_graph = cuda_graph
        self.device_id = device_id
        self.max_graphs = max_graphs
        self.engine = None
        self._lock = threading.RLock()  # one stream per runner: its copies and runs never interleave
        self._staging: dict[tuple, tuple] = {}
        self._finalizers: list[weakref.finalize] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    def activate_impl(self) -> None:
        trt = require("tensorrt", "gpu")
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        set_device(cudart, self.device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self._runtime is None:
            raise RunnerError(f"TensorRT {trt.__version__} could not create a runtime (see the TensorRT log)")
        with open(self.plan_path, "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise RunnerError(
                f"TensorRT {trt.__version__} could not deserialize {self.plan_path}: it was built by "
                "another TensorRT version or for another GPU; rebuild with `rf-export trt BUNDLE`"
            )
        # one activation scratch for every context of this runner (USER_MANAGED allocation)
        size = int(
            engine.device_memory_size_v2
            if hasattr(engine, "device_memory_size_v2")  # TensorRT >= 10.1
            else engine.device_memory_size
        )
        self._scratch = _DeviceMemory(cudart, size)
        self._scratch_size = size
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = int(self.stream)
        self.engine = engine

    def loaded_graph_impl(self) -> GraphSpec:
        # compared with the declared IO once, by Runner.activate, as for every runner
        return engine_graph_spec(self.trt, self.engine, self.name)

    def deactivate_impl(self) -> None:
        with self._lock:
            set_device(self.cudart, self.device_id)
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            for finalizer in self._finalizers:
                finalizer()  # destroys the binding's CUDA graphs (once)
            self._finalizers.clear()
            check_cuda(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.engine = None
            self._staging.clear()
            self._scratch = None

    # ---- buffers -----------------------------------------------------------------------------

    def allocate_impl(self, shape, dtype) -> Buffer:
        with self._lock:
            set_device(self.cudart, self.device_id)
            memory = _DeviceMemory(self.cudart, dtype_nbytes(dtype, int(np.prod(shape, dtype=np.int64))))
        return Buffer(shape, dtype, "cuda", memory.ptr, None, memory)

    def check_address(self, name: str, buffer: Buffer) -> None:
        if buffer.ptr % ALIGNMENT:
            where = (
                f" (a view at byte offset {buffer.ptr - buffer.base.ptr})" if buffer.base is not None else ""
            )
            raise RunnerError(
                f"{self.name}: the address of {name!r}{where} is not {ALIGNMENT}-byte aligned, which "
                "TensorRT needs for tensor addresses: use views whose byte offset is a multiple of "
                f"{ALIGNMENT}, or a buffer of its own"
            )

    def _host(self, buffer: Buffer) -> np.ndarray:
        """The page-locked staging array of a buffer: one per (address, dtype, shape), allocated on first
        use and reused (no steady-state allocation). bfloat16 is staged as uint16 bit patterns."""
        if buffer.dtype not in DTYPES and buffer.dtype != "bfloat16":
            raise RunnerError(
                f"{buffer.dtype} buffers cannot be read or written from the host; feed float32, "
                "float16 or bfloat16 tensors"
            )
        key = (buffer.ptr, buffer.dtype, buffer.shape)
        entry = self._staging.get(key)
        if entry is None:
            host_dtype = np.uint16 if buffer.dtype == "bfloat16" else DTYPES[buffer.dtype]
            pinned = _PinnedMemory(self.cudart, buffer.shape, host_dtype)
            wide = np.empty(buffer.shape, np.float32) if buffer.dtype == "bfloat16" else None
            entry = self._staging[key] = (pinned, wide)
        return entry[0].array

    def write_impl(self, buffer: Buffer, array: np.ndarray) -> None:
        with self._lock:
            host = self._host(buffer)
            if buffer.dtype == "bfloat16":
                if getattr(array, "dtype", None) is not None and array.dtype.name == "bfloat16":  # ml_dtypes
                    np.copyto(host, np.ascontiguousarray(array).view(np.uint16))
                else:
                    float32_to_bf16_bits(np.asarray(array), host)
            else:
                np.copyto(host, array, casting="same_kind")
            set_device(self.cudart, self.device_id)
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check_cuda(
                self.cudart.cudaMemcpyAsync(buffer.ptr, host.ctypes.data, host.nbytes, kind, self.stream),
                "cudaMemcpyAsync",
            )
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def read_impl(self, buffer: Buffer) -> np.ndarray:
        """The buffer's values in a staging array (float32 for a bfloat16 buffer)."""
        with self._lock:
            host = self._host(buffer)
            set_device(self.cudart, self.device_id)
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            check_cuda(
                self.cudart.cudaMemcpyAsync(host.ctypes.data, buffer.ptr, host.nbytes, kind, self.stream),
                "cudaMemcpyAsync",
            )
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            if buffer.dtype == "bfloat16":
                wide = self._staging[(buffer.ptr, buffer.dtype, buffer.shape)][1]
                return bf16_bits_to_float32(host, wide)
            return host

    def infer(self, feed):
        """``Runner.infer`` with the runner's lock held throughout: its one binding is written, run and
        read by one thread at a time (the arrays returned are still overwritten by the next call)."""
        with self._lock:
            return super().infer(feed)

    # ---- binding -----------------------------------------------------------------------------

    def bind_impl(self, binding: Binding) -> None:
        with self._lock:
            set_device(self.cudart, self.device_id)
            strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise RunnerError(
                    f"{self.name}: TensorRT could not create an execution context (see the TensorRT "
                    "log; out of GPU memory?)"
                )
            if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: the size is checked too
                context.set_device_memory(self._scratch.ptr, self._scratch_size)
            else:
                context.device_memory = self._scratch.ptr
            for name, buffer in binding.buffers.items():
                self.check_address(name, buffer)
                if not context.set_tensor_address(name, buffer.ptr):
                    raise RunnerError(f"{self.name}: TensorRT refused the address of {name!r}")
            graphs: collections.OrderedDict = collections.OrderedDict()
            binding.impl = {"context": context, "graphs": graphs}
            # the binding's graphs die with it (and at deactivate, whichever comes first)
            self._finalizers = [f for f in self._finalizers if f.alive]
            finalizer = weakref.finalize(binding, _destroy_graphs, self.cudart, graphs)
            finalizer.atexit = False  # at exit the CUDA context goes with the process
            self._finalizers.append(finalizer)

    def rebind_impl(self, binding: Binding, name: str) -> None:
        with self._lock:
            if not binding.impl["context"].set_tensor_address(name, binding.buffers[name].ptr):
                raise RunnerError(f"{self.name}: TensorRT refused the address of {name!r}")

    def graph_key(self, binding: Binding) -> tuple:
        """What a captured CUDA graph depends on: every tensor's shape and address."""
        return tuple((name, b.shape, b.ptr) for name, b in binding.buffers.items())

    # ---- running -----------------------------------------------------------------------------

    def run_impl(self, binding: Binding) -> None:
        with self._lock:
            set_device(self.cudart, self.device_id)
            context = binding.impl["context"]
            if not self.cuda_graph:
                if not context.execute_async_v3(self._stream_handle):
                    raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
            else:
                graphs = binding.impl["graphs"]
                key = self.graph_key(binding)
                exe = graphs.get(key)
                if exe is None:
                    while len(graphs) >= self.max_graphs:  # the least recently used goes
                        check_cuda(
                            self.cudart.cudaGraphExecDestroy(graphs.popitem(last=False)[1]),
                            "cudaGraphExecDestroy",
                        )
                    exe = graphs[key] = self._capture(context)
                else:
                    graphs.move_to_end(key)
                check_cuda(self.cudart.cudaGraphLaunch(exe, self.stream), "cudaGraphLaunch")
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _capture(self, context):
        cudart = self.cudart
        # one plain run first: TensorRT finishes lazy initialisation outside the capture
        if not context.execute_async_v3(self._stream_handle):
            raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            ok = context.execute_async_v3(self._stream_handle)
        finally:  # the stream must leave capture mode whatever happened
            graph = check_cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            if not ok:
                raise RunnerError(f"{self.name}: TensorRT execute_async_v3 failed during CUDA graph capture")
            return check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            check_cuda(
                cudart.cudaGraphDestroy(graph), "cudaGraphDestroy"
            )  # the instantiated graph does not need it


def current_gpu(device_id: int = 0) -> tuple[str, str] | None:
    """(compute capability "9.0", device name) of CUDA device ``device_id``, or None without cuda-python or a GPU."""
    try:
        cudart = import_cudart()
        props = check_cuda(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    except (ImportError, RunnerError):
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{props.major}.{props.minor}", name.rstrip("\x00")
