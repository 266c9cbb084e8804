"""``rf-export trt BUNDLE``: TensorRT plans from a bundle's ONNX graphs (TensorRT 10 / 11, through Polygraphy).

Each graph of the chosen precision is parsed into a strongly typed network (the only kind
TensorRT 11 builds: every tensor type comes from the ONNX graph, so no precision flags are set;
build fp16 plans from the ``@fp16`` graphs of ``rf-export onnx --precision fp32,fp16``) and built
on CUDA device ``device`` (made current first) with Polygraphy's loaders: ``NetworkFromOnnxPath``
(``parse_from_file``: external data OK), ``CreateConfig`` (TF32 cleared, so fp32 layers keep
their 23-bit mantissas; a workspace memory-pool limit) and ``EngineBytesFromNetwork``.

The timing cache (kernel timings reused by later builds on the same GPU; by default
``tensorrt-timing-<TensorRT version>-sm<capability>-<GPU>.cache`` beside the bundle directory, one
file per GPU kind so that GPUs never share one) is loaded once under Polygraphy's file lock, shared
by every graph's config, and merged back into the file under the lock at the end.

Nothing is written until every plan is built: plans go to temporary names beside their final
ones, renamed together at the end, then the manifest's ``plans`` section records, per graph, the
plan file, the TensorRT version, the GPU's compute capability and name, and the precision (a plan
only runs where those match; the bundle loader refuses it elsewhere with this command as the fix).
A failed build leaves the bundle, its old plans and the timing cache as they were.

tensorrt, cuda-python and polygraphy are imported only when a build starts; without them the
command says to install ``rf_runtime[gpu]`` on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import logging
import os
import re

from rf_runtime.errors import ConfigError, InputError, MissingDependencyError
from rf_runtime.files import atomic_write, output_folder, temp_file

log = logging.getLogger("rf_runtime")


def _require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            "building TensorRT plans needs TensorRT (>= 10), cuda-python and polygraphy: pip install 'rf_runtime[gpu]' "
            "on a machine with an NVIDIA GPU and driver (TensorRT needs an NVIDIA GPU; it cannot build on a CPU-only "
            "machine)"
        ) from exc
    return trt


def _require_polygraphy():
    """Polygraphy's TensorRT loaders, its messages sent to the ``rf_runtime.polygraphy`` logger (it
    prints to stdout by default; library code never prints)."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise MissingDependencyError(
            "building TensorRT plans needs polygraphy: pip install 'rf_runtime[gpu]'"
        ) from exc
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.python_logger = logging.getLogger("rf_runtime.polygraphy")
    from polygraphy.backend import trt as loaders

    return loaders


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(compute capability "9.0", device name) of CUDA device ``device``, through cuda-python (the
    same call and format as the runtime's check, ``rf_runtime.runners.tensorrt_runner.current_gpu``)."""
    from rf_runtime.runners.base import RunnerError
    from rf_runtime.runners.tensorrt_runner import check_cuda, import_cudart

    cudart = import_cudart()  # MissingDependencyError naming rf_runtime[gpu]
    try:
        prop = check_cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except RunnerError as exc:
        raise ConfigError(
            f"no usable CUDA device {device} ({exc}): TensorRT plans are built on the NVIDIA GPU "
            "they will run on"
        ) from exc
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name.rstrip("\x00")


def use_device(device: int) -> None:
    """Make CUDA device ``device`` current for this thread: TensorRT builds on the current device."""
    from rf_runtime.runners.base import RunnerError
    from rf_runtime.runners.tensorrt_runner import check_cuda, import_cudart

    try:
        check_cuda(import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")
    except RunnerError as exc:
        raise ConfigError(f"cannot use CUDA device {device} ({exc}): pick a device this machine has") from exc


def default_timing_cache(bundle_dir: str, tensorrt_version: str, capability: str, device_name: str) -> str:
    """Beside the bundle (not in it: a bundle lists every file it holds), one file per TensorRT
    version and GPU kind, shared by the bundles built on this machine."""
    gpu = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"
    name = f"tensorrt-timing-{tensorrt_version}-sm{capability.replace('.', '')}-{gpu}.cache"
    return os.path.join(os.path.dirname(os.path.abspath(bundle_dir)), name)


def plan_path(graph: str, precision: str) -> str:
    """The plan's file name inside the bundle: ``dit_step@fp16`` -> ``dit_step.fp16.plan``."""
    base = graph.partition("@")[0]
    return f"{base}.{precision}.plan" if precision != "fp32" else f"{base}.plan"


class TimingCache:
    """A TensorRT timing cache file, loaded once, shared by every graph's builder config, saved at the end.

    Hand-written around Polygraphy's ``LockFile`` because Polygraphy's own handling
    (``CreateConfig(load_timing_cache=)``, ``EngineBytesFromNetwork(save_timing_cache=)``) does not do
    what a shared file needs: it ignores the result of ``set_timing_cache`` (False for a cache from
    another TensorRT version or GPU; the build then has no cache, ``get_timing_cache()`` is None and
    nothing is saved, silently), merges the file back with ``ignore_mismatch=True`` (another GPU's
    timings into ours), writes the file in place rather than through a temporary name, and loads the
    file afresh for every graph (a later graph cannot reuse an earlier graph's timings).
    """

    def __init__(self, path: str):
        from polygraphy.util import LockFile

        self.path, self._lock = path, LockFile
        output_folder(path, "the TensorRT timing cache")  # an unwritable folder fails before any build
        with LockFile(path):
            self.blob = _read(path) if os.path.isfile(path) else b""
        self.cache = None
        self._config = None

    def attach(self, builder, network, config) -> None:
        """Polygraphy ``PostprocessConfig`` hook: put the shared cache on ``config``; a cache TensorRT
        refuses raises (naming the fix) before anything is built."""
        if self.cache is None:
            cache = config.create_timing_cache(self.blob)
            if cache is None:
                raise ConfigError(
                    f"{self.path} is not a TensorRT timing cache or is damaged: delete it, or pass "
                    "--timing-cache with another file"
                )
            self.cache, self._config = cache, config
        if not config.set_timing_cache(self.cache, ignore_mismatch=False):
            if not self.blob:
                raise ConfigError("TensorRT refused a new, empty timing cache (see the TensorRT log)")
            raise ConfigError(
                f"the timing cache {self.path} was written by another TensorRT version or for another "
                "GPU, and TensorRT refuses it here: delete it, or pass --timing-cache with a file for "
                "this GPU"
            )

    def save(self) -> None:
        """Merge the file's current contents (another build may have saved since we loaded it) into our
        cache and write it atomically, under the lock."""
        if self.cache is None:
            return
        with self._lock(self.path):
            disk = _read(self.path) if os.path.isfile(self.path) else b""
            if disk and disk != self.blob:
                other = self._config.create_timing_cache(disk)
                if other is None or not self.cache.combine(other, ignore_mismatch=False):
                    log.warning(
                        "the timing cache %s changed during this build and cannot be merged with it; it is "
                        "replaced by this build's cache",
                        self.path,
                    )
            serialized = self.cache.serialize()
            if serialized is None:
                raise ConfigError(
                    f"TensorRT could not serialize the timing cache for {self.path} (see its log)"
                )
            atomic_write(self.path, lambda f: f.write(serialized), what="the TensorRT timing cache")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def select_graphs(manifest: dict, precision: str, graphs=None) -> list[str]:
    """The graph names of ``precision`` in the bundle (``graphs`` narrows them), or an InputError."""
    available = sorted(n for n, g in manifest["graphs"].items() if g["precision"] == precision)
    if not available:
        raise InputError(
            f"the bundle has no {precision} graphs: rebuild it with `rf-export onnx --model-dir MODEL_DIR "
            f"--out BUNDLE --precision fp32,{precision}` (or pick --precision fp32)"
        )
    if graphs:
        missing = sorted(set(graphs) - set(available))
        if missing:
            raise InputError(
                f"graph(s) {missing} are not {precision} graphs of the bundle; it has {available}"
            )
        return [g for g in available if g in graphs]
    return available


def build_engine(onnx_path: str, *, workspace_mib: int, timing_cache: TimingCache | None = None):
    """The serialized engine (``IHostMemory``) of one ONNX graph, through Polygraphy's loaders: strongly
    typed network, TF32 off, the workspace limit, the shared timing cache. A ConfigError on failure."""
    from polygraphy.exception import PolygraphyException

    trt = _require_tensorrt()
    loaders = _require_polygraphy()
    network = loaders.NetworkFromOnnxPath(onnx_path, strongly_typed=True)
    # tf32=False clears the TF32 flag, which a new builder config has set
    config = loaders.CreateConfig(
        tf32=False, memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20}
    )
    if timing_cache is not None:
        config = loaders.PostprocessConfig(config, timing_cache.attach)
    try:
        return loaders.EngineBytesFromNetwork(network, config)()
    except PolygraphyException as exc:
        raise ConfigError(
            f"TensorRT {trt.__version__} could not build a plan from {onnx_path}: {exc} (TensorRT's "
            "messages are in the rf_runtime.polygraphy log); if it ran out of memory a larger "
            f"--workspace-mib than {workspace_mib} may help"
        ) from exc


def build_plans(
    bundle_dir,
    *,
    precision: str = "fp16",
    workspace_mib: int = 4096,
    timing_cache=None,
    graphs=None,
    device: int = 0,
) -> dict:
    """Build a plan for every ``precision`` graph of the bundle on CUDA device ``device``; record them
    in the manifest. Returns the new ``plans`` entries. Arguments are checked before TensorRT is
    imported; nothing in the bundle changes unless every plan builds."""
    from rf_runtime.bundle import Bundle

    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if not isinstance(workspace_mib, int) or workspace_mib <= 0:
        raise ConfigError(f"workspace_mib must be a positive number of MiB, got {workspace_mib!r}")
    if not isinstance(device, int) or device < 0:
        raise ConfigError(f"device must be a CUDA device index (0, 1, ...), got {device!r}")
    bundle_dir = os.fspath(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    names = select_graphs(manifest, precision, graphs)
    trt = _require_tensorrt()
    _require_polygraphy()
    capability, device_name = gpu_info(device)
    use_device(device)  # the builder builds for the current device: the one the manifest will name
    cache = TimingCache(
        os.fspath(timing_cache)
        if timing_cache
        else default_timing_cache(bundle_dir, trt.__version__, capability, device_name)
    )
    staged: dict[str, tuple[str, str]] = {}  # graph -> (plan path in the bundle, temporary file)
    try:
        for graph in names:
            onnx_path = bundle.graph_file(graph)
            log.info("building a TensorRT plan for %s", graph)
            serialized = build_engine(onnx_path, workspace_mib=workspace_mib, timing_cache=cache)
            rel_path = plan_path(graph, precision)
            fd, tmp = temp_file(os.path.join(bundle_dir, rel_path), "the TensorRT plan")
            staged[graph] = (rel_path, tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(serialized)
        for rel_path, tmp in staged.values():  # every plan built: now the bundle changes
            os.replace(tmp, os.path.join(bundle_dir, rel_path))
    except BaseException:
        for _, tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    plans = record_plans(
        bundle_dir,
        manifest,
        {g: p for g, (p, _) in staged.items()},
        tensorrt_version=trt.__version__,
        compute_capability=capability,
        device_name=device_name,
        precision=precision,
    )
    cache.save()
    return plans


def record_plans(
    bundle_dir: str,
    manifest: dict,
    built: dict[str, str],
    *,
    tensorrt_version: str,
    compute_capability: str,
    device_name: str,
    precision: str,
) -> dict:
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
        plans[graph] = {
            "file": key,
            "tensorrt_version": tensorrt_version,
            "compute_capability": compute_capability,
            "device_name": device_name,
            "precision": precision,
        }
    manifest.setdefault("plans", {}).update(plans)
    write_manifest(bundle_dir, manifest)
    return plans
