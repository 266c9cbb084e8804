"""Which runner family runs an engine bundle here: onnxruntime or TensorRT (``choose_backend``).

TensorRT when the bundle has a plan for every graph built for this GPU and TensorRT version and
tensorrt + cuda-python are installed; else onnxruntime. An explicit choice that cannot run here is
an error that says why, never a silent fallback. No torch, no TensorRT import until it is needed.
"""

from __future__ import annotations

import logging

from rf_runtime.bundle import Bundle
from rf_runtime.errors import ConfigError, require
from rf_runtime.graph_io import GRAPHS, base_graph

logger = logging.getLogger("rf_runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")


def plan_names(bundle: Bundle) -> dict[str, str]:
    """For each runtime graph, the plan built from it (``dit_step`` or a variant ``dit_step@fp16``)."""
    found = {}
    for graph in GRAPHS:
        names = sorted(p for p in bundle.plans if base_graph(p) == graph)
        if names:
            found[graph] = graph if graph in names else names[0]
    return found


def tensorrt_here() -> tuple[str | None, str | None]:
    """(TensorRT version, GPU compute capability) of this machine; None for what is missing."""
    try:
        trt = require("tensorrt", "gpu")
    except ImportError:
        return None, None
    from rf_runtime.runners.tensorrt_runner import current_gpu

    gpu = current_gpu()
    return trt.__version__, (gpu[0] if gpu else None)


def choose_backend(bundle: Bundle, backend: str, device: str, here=tensorrt_here) -> str:
    """ "onnxruntime" or "tensorrt" for this bundle on this machine; never a silent fallback from
    an explicit choice. ``here`` gives (TensorRT version, compute capability)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if backend == "onnxruntime":
        return backend
    if device != "cuda":
        if backend == "tensorrt":
            raise ConfigError(
                "TensorRT runs on a CUDA GPU: use device='cuda' with backend='tensorrt', or "
                "backend='onnxruntime' for the CPU"
            )
        return "onnxruntime"
    plans = plan_names(bundle)
    if backend == "tensorrt":
        version, capability = here()
        if version is None:
            require("tensorrt", "gpu")  # raises MissingDependencyError naming rf_runtime[gpu]
        if capability is None:
            from rf_runtime.runners.tensorrt_runner import import_cudart

            import_cudart()  # cuda-python missing: MissingDependencyError naming rf_runtime[gpu]
        bundle.check_plans([plans.get(g, g) for g in GRAPHS], version, capability)
        return "tensorrt"
    if len(plans) < len(GRAPHS):
        logger.info(
            "bundle %s has no TensorRT plans for every graph: running it with onnxruntime", bundle.path
        )
        return "onnxruntime"
    version, capability = here()
    problems = {n: p for n, p in bundle.plan_problems(version, capability).items() if n in plans.values()}
    if problems:
        logger.info(
            "not using the bundle's TensorRT plans (%s): running it with onnxruntime",
            "; ".join(f"{n}: {p}" for n, p in problems.items()),
        )
        return "onnxruntime"
    return "tensorrt"
