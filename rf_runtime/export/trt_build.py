"""``rf-export trt BUNDLE``: TensorRT plans from a bundle's ONNX graphs (TensorRT 10 / 11 Python API).

Each graph of the chosen precision is parsed into a strongly typed network (the only kind
TensorRT 11 builds: every tensor type comes from the ONNX graph, so no precision flags are set;
build fp16 plans from the ``@fp16`` graphs of ``rf-export onnx --precision fp32,fp16``), built with
a workspace memory-pool limit and a timing cache that is loaded before and saved after (later
builds on the same GPU reuse the kernel timings; by default ``tensorrt-timing.cache`` beside the
bundle directory), and written atomically as ``<graph>.<precision>.plan`` in the bundle.
The manifest's ``plans`` section records, per graph, the plan file, the TensorRT version, the GPU's
compute capability and name, and the precision: a plan only runs where those match, and the
bundle loader refuses it elsewhere with this command as the fix.

tensorrt and cuda-python are imported only here and only when a build starts; without them the
command says to install ``rf_runtime[gpu]`` on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import logging
import os

from rf_runtime.errors import ConfigError, InputError, MissingDependencyError
from rf_runtime.files import atomic_write

log = logging.getLogger("rf_runtime")
TIMING_CACHE = "tensorrt-timing.cache"


def _require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            "building TensorRT plans needs TensorRT (>= 10) and cuda-python: pip install 'rf_runtime[gpu]' on a "
            "machine with an NVIDIA GPU and driver (TensorRT needs an NVIDIA GPU; it cannot build on a CPU-only "
            "machine)") from exc
    return trt


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(compute capability "9.0", device name) of CUDA device ``device``, through cuda-python (the
    same call and format as the runtime's check, ``rf_runtime.runners.tensorrt_runner.current_gpu``)."""
    from rf_runtime.runners.base import RunnerError
    from rf_runtime.runners.tensorrt_runner import check_cuda, import_cudart

    cudart = import_cudart()  # MissingDependencyError naming rf_runtime[gpu]
    try:
        prop = check_cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except RunnerError as exc:
        raise ConfigError(f"no usable CUDA device {device} ({exc}): TensorRT plans are built on the NVIDIA GPU "
                          "they will run on") from exc
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name.rstrip("\x00")


def select_graphs(manifest: dict, precision: str, graphs=None) -> list[str]:
    """The graph names of ``precision`` in the bundle (``graphs`` narrows them), or an InputError."""
    available = sorted(n for n, g in manifest["graphs"].items() if g["precision"] == precision)
    if not available:
        raise InputError(f"the bundle has no {precision} graphs: rebuild it with `rf-export onnx --model-dir MODEL_DIR "
                         f"--out BUNDLE --precision fp32,{precision}` (or pick --precision fp32)")
    if graphs:
        missing = sorted(set(graphs) - set(available))
        if missing:
            raise InputError(f"graph(s) {missing} are not {precision} graphs of the bundle; it has {available}")
        return [g for g in available if g in graphs]
    return available


def build_plans(bundle_dir, *, precision: str = "fp16", workspace_mib: int = 4096, timing_cache=None,
                graphs=None, device: int = 0) -> dict:
    """Build a plan for every ``precision`` graph of the bundle; record them in the manifest.

    Returns the new ``plans`` entries. Arguments are checked before TensorRT is imported.
    """
    from rf_runtime.bundle import Bundle

    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if not isinstance(workspace_mib, int) or workspace_mib <= 0:
        raise ConfigError(f"workspace_mib must be a positive number of MiB, got {workspace_mib!r}")
    bundle_dir = os.fspath(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    names = select_graphs(manifest, precision, graphs)
    trt = _require_tensorrt()
    capability, device_name = gpu_info(device)
    # default: beside the bundle (not in it: a bundle lists every file it holds), shared by the
    # bundles built on this machine
    cache_path = os.fspath(timing_cache) if timing_cache else os.path.join(
        os.path.dirname(os.path.abspath(bundle_dir)), TIMING_CACHE)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    built = {}
    for graph in names:
        onnx_path = bundle.graph_file(graph)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(onnx_path):  # reads external data beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        blob = b""
        if os.path.isfile(cache_path):
            with open(cache_path, "rb") as f:
                blob = f.read()
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        log.info("building a TensorRT plan for %s", graph)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ConfigError(f"TensorRT {trt.__version__} failed to build {graph} from {onnx_path} (see the TensorRT "
                              f"log above); a larger --workspace-mib than {workspace_mib} may help")
        base, prec = graph.partition("@")[0], precision
        rel_path = f"{base}.{prec}.plan" if prec != "fp32" else f"{base}.plan"
        atomic_write(os.path.join(bundle_dir, rel_path), lambda f: f.write(serialized), what="the TensorRT plan")
        timing = bytes(config.get_timing_cache().serialize())
        atomic_write(cache_path, lambda f: f.write(timing), what="the timing cache")
        built[graph] = rel_path
    return record_plans(bundle_dir, manifest, built, tensorrt_version=trt.__version__, compute_capability=capability,
                        device_name=device_name, precision=precision)


def record_plans(bundle_dir: str, manifest: dict, built: dict[str, str], *, tensorrt_version: str,
                 compute_capability: str, device_name: str, precision: str) -> dict:
    """Record plan files (``built``: graph name -> plan path inside the bundle) in the schema-2
    manifest: each file under the key ``plan:<graph>`` in ``files``, and ``plans[<graph>]`` with the
    TensorRT version, compute capability and GPU it was built for; then rewrite manifest.json through
    ``rf_runtime.bundle.write_manifest`` (every file hashed again, written atomically).
    Returns the new ``plans`` entries."""
    from rf_runtime.bundle import write_manifest

    plans = {}
    for graph, rel_path in built.items():
        if graph not in manifest["graphs"]:
            raise InputError(f"{graph!r} is not a graph of the bundle; it has {sorted(manifest['graphs'])}")
        key = f"plan:{graph}"
        manifest["files"][key] = {"path": rel_path}
        plans[graph] = {"file": key, "tensorrt_version": tensorrt_version, "compute_capability": compute_capability,
                        "device_name": device_name, "precision": precision}
    manifest.setdefault("plans", {}).update(plans)
    write_manifest(bundle_dir, manifest)
    return plans


def run_plan(plan_path: str, feeds: dict, out_names) -> list:
    """Run a plan once on CUDA device 0 (for ``rf-export verify``): numpy in, float32 numpy out.

    Buffers are torch CUDA tensors bound with ``set_tensor_address``; ``execute_async_v3`` runs on a
    torch stream. (The streaming runtime has its own runner with persistent buffers.)
    """
    import numpy as np
    import torch

    trt = _require_tensorrt()
    types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    with open(plan_path, "rb") as f:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
    if engine is None:
        raise ConfigError(f"{plan_path} does not load on this GPU / TensorRT version: rebuild it with `rf-export trt BUNDLE`")
    context = engine.create_execution_context()
    tensors = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = types[engine.get_tensor_dtype(name)]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            value = np.asarray(feeds[name])
            host = torch.from_numpy(value if value.dtype == np.int64 else value.astype(np.float32))
            tensors[name] = host.to(device="cuda", dtype=dtype).contiguous()
        else:
            tensors[name] = torch.empty(tuple(engine.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, tensors[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ConfigError(f"TensorRT could not run {plan_path}")
    stream.synchronize()
    return [tensors[n].float().cpu().numpy() for n in out_names]
