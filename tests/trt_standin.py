"""A stand-in for the ``tensorrt`` and cuda-python (``cuda.bindings.runtime``) modules, for tests of
THIS PROJECT's control flow around them (tests/test_trt_control_flow.py). It is not TensorRT and
proves nothing about TensorRT: it records calls and returns what the real calls return (None for a
failed deserialize / context / build / bad timing cache, False for a refused address, a refused
timing cache or a failed enqueue, ``(cudaError_t, value)`` tuples from every CUDA call), so that a
test can check that every return value is handled, files appear only at the end, graphs are
destroyed, staging is keyed right, alignment is checked, TF32 is cleared, the device is set, ...

"Device" memory is host memory (ctypes buffers) at 256-byte-aligned addresses, with a caching
allocator that hands a freed address to the next allocation that fits (as CUDA's allocators do);
copies check their bounds; an engine's one "kernel" computes ``y = 2 x + 1`` from the addresses bound
when it is enqueued (so a stale CUDA graph replays stale addresses, as a real one would). bfloat16
conversions use ml_dtypes (an implementation independent of the runner's).
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import time
import types

import ml_dtypes
import numpy as np

NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64}


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class _Handle:
    def __init__(self, n):
        self.n = n

    def __int__(self):
        return self.n


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime: the calls the runner and the build make, each returning (error, *values)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.reset()

    def reset(self):
        self.calls = []  # (name, args)
        self.fail_next = {}  # call name -> error to return once
        self.blocks = {}  # ptr -> [buffer, capacity, nbytes, kind]
        self.free = []  # freed (ptr, capacity, buffer), reused LIFO
        self.live_graphs, self.live_execs, self.destroyed_execs = set(), set(), 0
        self.capturing = {}  # stream -> list of captured launches
        self.pageable_copies = 0
        self.local = threading.local()
        self.devices = {0: ("8.9", b"Stand-in GPU zero"), 1: ("9.0", b"Stand-in GPU one")}
        self._n = 1000
        self._lock = threading.Lock()

    # bookkeeping
    def _call(self, name, *args):
        with self._lock:
            self.calls.append((name, args))
            return self.fail_next.pop(name, None)

    def _next(self):
        self._n += 1
        return self._n

    def current_device(self):
        return getattr(self.local, "device", 0)

    def names(self):
        return [c[0] for c in self.calls]

    def _alloc(self, nbytes, kind):
        with self._lock:
            for i, (ptr, cap, buf) in enumerate(reversed(self.free)):
                if cap >= nbytes:
                    del self.free[len(self.free) - 1 - i]
                    self.blocks[ptr] = [buf, cap, nbytes, kind]
                    return ptr
            buf = ctypes.create_string_buffer(nbytes + 256)
            ptr = (ctypes.addressof(buf) + 255) // 256 * 256
            self.blocks[ptr] = [buf, nbytes, nbytes, kind]
            return ptr

    def _release(self, ptr, kind):
        with self._lock:
            block = self.blocks.pop(int(ptr), None)
            if block is None or block[3] != kind:
                return cudaError_t.cudaErrorInvalidValue
            self.free.append((int(ptr), block[1], block[0]))
            return cudaError_t.cudaSuccess

    def inside(self, ptr, nbytes):
        """The kind of the live allocation holding [ptr, ptr + nbytes), or None."""
        for start, (_, _, size, kind) in self.blocks.items():
            if start <= ptr and ptr + nbytes <= start + size:
                return kind
        return None

    def live_device_allocations(self):
        return sum(1 for b in self.blocks.values() if b[3] == "device")

    # the CUDA runtime API
    def cudaSetDevice(self, device):
        err = self._call("cudaSetDevice", device)
        if err:
            return (err,)
        if device not in self.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self.local.device = device
        return (cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, device):
        err = self._call("cudaGetDeviceProperties", device)
        if err or device not in self.devices:
            return (err or cudaError_t.cudaErrorInvalidDevice, None)
        cc, name = self.devices[device]
        major, minor = (int(x) for x in cc.split("."))
        return (
            cudaError_t.cudaSuccess,
            types.SimpleNamespace(name=name + b"\x00\x00", major=major, minor=minor),
        )

    def cudaMalloc(self, nbytes):
        err = self._call("cudaMalloc", nbytes)
        return (err, 0) if err else (cudaError_t.cudaSuccess, self._alloc(nbytes, "device"))

    def cudaMallocHost(self, nbytes):
        err = self._call("cudaMallocHost", nbytes)
        return (err, 0) if err else (cudaError_t.cudaSuccess, self._alloc(nbytes, "pinned"))

    def cudaFree(self, ptr):
        self._call("cudaFree", ptr)
        return (self._release(ptr, "device"),)

    def cudaFreeHost(self, ptr):
        self._call("cudaFreeHost", ptr)
        return (self._release(ptr, "pinned"),)

    def cudaMemset(self, ptr, value, nbytes):
        err = self._call("cudaMemset", ptr, value, nbytes)
        if err or self.inside(ptr, nbytes) != "device":
            return (err or cudaError_t.cudaErrorInvalidValue,)
        ctypes.memset(ptr, value, nbytes)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        err = self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)
        if err:
            return (err,)
        device, host = (dst, src) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else (src, dst)
        if self.inside(device, nbytes) != "device":
            return (cudaError_t.cudaErrorInvalidValue,)  # past the end of the device buffer
        if self.inside(host, nbytes) != "pinned":
            self.pageable_copies += 1  # legal in CUDA, but the copy is then synchronous
        ctypes.memmove(dst, src, nbytes)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):
        err = self._call("cudaStreamCreate")
        return (err, None) if err else (cudaError_t.cudaSuccess, _Handle(self._next()))

    def cudaStreamSynchronize(self, stream):
        return (self._call("cudaStreamSynchronize", int(stream)) or cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        return (self._call("cudaStreamDestroy", int(stream)) or cudaError_t.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        err = self._call("cudaStreamBeginCapture", int(stream), mode)
        if not err:
            self.capturing[int(stream)] = []
        return (err or cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        err = self._call("cudaStreamEndCapture", int(stream))
        launches = self.capturing.pop(int(stream), None)
        if err or launches is None:
            return (err or cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        graph = _Handle(self._next())
        graph.launches = launches
        self.live_graphs.add(graph.n)
        return (cudaError_t.cudaSuccess, graph)

    def cudaGraphInstantiate(self, graph, flags):
        err = self._call("cudaGraphInstantiate", int(graph), flags)
        if err:
            return (err, None)
        exe = _Handle(self._next())
        exe.launches = list(graph.launches)
        self.live_execs.add(exe.n)
        return (cudaError_t.cudaSuccess, exe)

    def cudaGraphDestroy(self, graph):
        self._call("cudaGraphDestroy", int(graph))
        self.live_graphs.discard(int(graph))
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, exe):
        self._call("cudaGraphExecDestroy", int(exe))
        if int(exe) in self.live_execs:
            self.live_execs.discard(int(exe))
            self.destroyed_execs += 1
        return (cudaError_t.cudaSuccess,)

    def cudaGraphLaunch(self, exe, stream):
        err = self._call("cudaGraphLaunch", int(exe), int(stream))
        if err or int(exe) not in self.live_execs:
            return (err or cudaError_t.cudaErrorInvalidValue,)
        for launch in exe.launches:
            launch()
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, stream: int, launch) -> None:
        """A kernel launch on ``stream``: recorded while it is captured, else run now."""
        if stream in self.capturing:
            self.capturing[stream].append(launch)
        else:
            launch()


# ---- tensorrt ------------------------------------------------------------------------------------


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


DTYPE_NAMES = {
    DataType.FLOAT: "float32",
    DataType.HALF: "float16",
    DataType.BF16: "bfloat16",
    DataType.INT64: "int64",
}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 5
    DISABLE_TIMING_CACHE = 6
    TF32 = 7
    BF16 = 17


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class ProfilingVerbosity(enum.IntEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class LayerType(enum.IntEnum):
    SHAPE = 0


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity=None):
        self.severity = severity


class ILogger:
    def __init__(self):
        pass


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype, self.is_shape_tensor = name, tuple(shape), dtype, False


class Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs = [_Tensor("x", (4,), DataType.FLOAT)]
        self.parsed = None

    num_inputs = property(lambda self: len(self.inputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_flag(self, flag):
        return bool(self.flags & (1 << int(flag)))

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.flags, self.errors = network, 0, []

    def parse_from_file(self, path):
        TRT.calls.append(("parse_from_file", path))
        if path in TRT.unparsable:
            self.errors = [f"In node 3 (Bogus): UNSUPPORTED_NODE: {path}"]
            return False
        self.network.parsed = path
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):
        self.shapes[name] = (min, opt, max)
        return True

    def __bool__(self):
        return True


class TimingCache:
    """Serialized as b"TCACHE <device> <json list of entries>"."""

    def __init__(self, device, entries):
        self.device, self.entries = device, list(entries)

    def serialize(self):
        return b"TCACHE %d " % self.device + json.dumps(sorted(set(self.entries))).encode()

    def combine(self, other, ignore_mismatch):
        TRT.calls.append(("combine", ignore_mismatch))
        if other.device != self.device and not ignore_mismatch:
            return False
        self.entries += other.entries
        return True


class BuilderConfig:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # TF32 is on in a new config (TensorRT 10 and 11)
        self.pools, self.profiles, self.cache = {}, [], None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.DLA_core, self.default_device_type, self.int8_calibrator = -1, DeviceType.GPU, None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool, 1 << 40)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, blob):
        blob = bytes(blob)
        if not blob:
            return TimingCache(CUDART.current_device(), [])
        if not blob.startswith(b"TCACHE "):
            return None  # createTimingCache returns nullptr for bytes that are not a cache
        _, device, entries = blob.split(b" ", 2)
        return TimingCache(int(device), json.loads(entries))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.device != CUDART.current_device() and not ignore_mismatch:
            self.cache = None
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return Network(flags)

    def create_builder_config(self):
        return BuilderConfig()

    def create_optimization_profile(self):
        return OptimizationProfile()

    def build_serialized_network(self, network, config):
        TRT.builds.append(
            {
                "onnx": network.parsed,
                "strongly_typed": network.get_flag(1),
                "tf32": config.get_flag(BuilderFlag.TF32),
                "workspace": config.pools.get(0),
                "device": CUDART.current_device(),
                "cache": config.cache,
            }
        )
        if TRT.on_build:
            TRT.on_build(len(TRT.builds))
        if network.parsed in TRT.unbuildable:
            return None
        if config.cache is not None:
            config.cache.entries.append(network.parsed.rsplit("/", 1)[-1])
        return b"FAKEPLAN " + network.parsed.encode()


# engines: a plan file is JSON {"inputs": [[name, shape, dtype]], "outputs": [...], "scratch": bytes}


def make_plan(inputs, outputs, scratch=4096) -> bytes:
    return json.dumps({"inputs": inputs, "outputs": outputs, "scratch": scratch}).encode()


class Engine:
    def __init__(self, spec, device):
        self.spec, self.device = spec, device
        self.io = [(n, tuple(s), d, TensorIOMode.INPUT) for n, s, d in spec["inputs"]]
        self.io += [(n, tuple(s), d, TensorIOMode.OUTPUT) for n, s, d in spec["outputs"]]
        self.device_memory_size_v2 = spec["scratch"]
        self.device_memory_size = spec["scratch"]

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_shape(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return next(k for k, v in DTYPE_NAMES.items() if v == self._find(name)[2])

    def get_tensor_mode(self, name):
        return self._find(name)[3]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        TRT.calls.append(("create_execution_context", strategy))
        if TRT.no_context:
            return None
        return ExecutionContext(self, strategy)


class ExecutionContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.addresses, self.scratch = {}, None

    def set_device_memory(self, ptr, size):
        TRT.calls.append(("set_device_memory", ptr, size))
        if size < self.engine.device_memory_size_v2:
            return  # TensorRT logs an error; execution then fails
        self.scratch = ptr

    def set_tensor_address(self, name, ptr):
        if ptr % 256 or name not in {t[0] for t in self.engine.io}:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        TRT.calls.append(("execute_async_v3", stream))
        if TRT.fail_execute:
            TRT.fail_execute -= 1
            return False
        if CUDART.current_device() != self.engine.device:
            return False  # enqueued on the wrong device
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.scratch is None:
            return False
        if set(self.addresses) != {t[0] for t in self.engine.io}:
            return False
        addresses, scratch, io = dict(self.addresses), self.scratch, self.engine.io
        CUDART.enqueue(int(stream), lambda: _kernel(io, addresses, scratch))
        return True


def _view(ptr, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(NP[dtype]).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), NP[dtype]).reshape(shape)


def _kernel(io, addresses, scratch):
    """y = 2 x + 1 for each output (from the first input), in float32, stored in the output's dtype;
    counts two kernels on one scratch buffer at once (a runner must serialise its contexts)."""
    key = scratch or 0
    with TRT.lock:
        TRT.overlaps += key in TRT.busy
        TRT.busy.add(key)
    try:
        name, shape, dtype, _ = io[0]
        x = _view(addresses[name], shape, dtype).astype(np.float32)
        time.sleep(0.0005)
        for oname, oshape, odtype, mode in io:
            if mode == TensorIOMode.OUTPUT:
                _view(addresses[oname], oshape, odtype)[...] = (2 * x + 1).astype(NP[odtype])
    finally:
        with TRT.lock:
            TRT.busy.discard(key)


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, blob):
        TRT.calls.append(("deserialize_cuda_engine", len(blob)))
        try:
            spec = json.loads(bytes(blob))
        except ValueError:
            return None  # not a plan (or another version's): TensorRT returns None
        return Engine(spec, CUDART.current_device())


class FakeTensorRT(types.ModuleType):
    __version__ = "10.13.0.35"
    DataType, TensorIOMode, NetworkDefinitionCreationFlag = (
        DataType,
        TensorIOMode,
        NetworkDefinitionCreationFlag,
    )
    BuilderFlag, MemoryPoolType, ProfilingVerbosity, DeviceType = (
        BuilderFlag,
        MemoryPoolType,
        ProfilingVerbosity,
        DeviceType,
    )
    ExecutionContextAllocationStrategy, LayerType = ExecutionContextAllocationStrategy, LayerType
    Logger, ILogger, Builder, OnnxParser, Runtime = Logger, ILogger, Builder, OnnxParser, Runtime

    def __init__(self):
        super().__init__("tensorrt")
        self.__file__ = __file__
        self.reset()

    def reset(self):
        self.calls, self.builds = [], []
        self.unparsable, self.unbuildable = set(), set()
        self.on_build = None
        self.no_context, self.fail_execute = False, 0
        self.lock, self.busy, self.overlaps = threading.Lock(), set(), 0

    @staticmethod
    def init_libnvinfer_plugins(logger, namespace):
        return True


CUDART = FakeCudart()
TRT = FakeTensorRT()
