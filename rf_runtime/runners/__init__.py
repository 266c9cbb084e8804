"""One Runner interface over every execution backend (see ``rf_runtime.runners.base``).

    from rf_runtime.runners import OnnxRuntimeRunner, GraphSpec
    with OnnxRuntimeRunner("bundle/dit_step.onnx", graph) as runner:
        outputs = runner.infer(feed)   # {output name: numpy array}

``TorchRunner`` needs torch and ``TensorRTRunner`` needs tensorrt + cuda-python; both are
imported only when those runners are activated.
"""

from rf_runtime.runners.base import Binding, Buffer, GraphSpec, Runner, RunnerError, TensorSpec
from rf_runtime.runners.onnxruntime_runner import OnnxRuntimeRunner
from rf_runtime.runners.tensorrt_runner import TensorRTRunner
from rf_runtime.runners.torch_runner import TorchRunner

__all__ = [
    "Runner",
    "Binding",
    "Buffer",
    "GraphSpec",
    "TensorSpec",
    "RunnerError",
    "OnnxRuntimeRunner",
    "TorchRunner",
    "TensorRTRunner",
]
