"""The Runner contract, checked the same way for every Runner subclass (Polygraphy's lesson: the one
runner left out of the shared test is the one that breaks the contract).

A tiny two-input, two-output graph is exported to ONNX; every runner must refuse use before
activate(), check input names / shapes / dtypes, return the same named outputs, agree with the
PyTorch module computed directly (fp32, relative error < 1e-5), and run on bound buffers without
moving them. Runners whose backend is not installed here are skipped with the reason.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from rf_runtime.errors import MissingDependencyError, RFError  # noqa: E402
from rf_runtime.runners import (  # noqa: E402
    GraphSpec,
    OnnxRuntimeRunner,
    Runner,
    RunnerError,
    TensorRTRunner,
    TensorSpec,
    TorchRunner,
)
from rf_runtime.runners.tensorrt_runner import check_cuda  # noqa: E402

TOL = 1e-5  # relative error of every runner against the torch module, fp32
GRAPH = GraphSpec(
    "tiny",
    (TensorSpec("x", (2, 3, 4), "float32"), TensorSpec("scale", (1,), "float32")),
    (TensorSpec("y", (2, 3, 5), "float32"), TensorSpec("total", (2, 3), "float32")),
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, scale):
        return torch.tanh(x @ self.w) * scale, x.sum(-1) + scale


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("runners") / "tiny.onnx"
    args = (torch.zeros(2, 3, 4), torch.ones(1))
    torch.onnx.export(
        Tiny(),
        args,
        str(path),
        input_names=["x", "scale"],
        output_names=["y", "total"],
        opset_version=17,
        dynamo=False,
    )
    return path


def build_plan(onnx_path, out):
    """A TensorRT engine of the tiny graph (only where TensorRT and a GPU exist), built as `rf-export trt`
    builds: TF32 off, or the 1e-5 tolerance would not hold for an fp32 matmul."""
    pytest.importorskip("tensorrt")
    from rf_runtime.export.trt_build import build_engine

    out.write_bytes(bytes(build_engine(str(onnx_path), workspace_mib=256)))
    return out


def make_torch(onnx_path, tmp_path):
    return TorchRunner(Tiny(), GRAPH)


def make_ort_cpu(onnx_path, tmp_path):
    return OnnxRuntimeRunner(onnx_path, GRAPH, device="cpu")


def make_ort_cuda(onnx_path, tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (no onnxruntime-gpu / GPU)")
    return OnnxRuntimeRunner(onnx_path, GRAPH, device="cuda")


def make_tensorrt(onnx_path, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs a GPU machine)")
    pytest.importorskip("cuda", reason="cuda-python is not installed here")
    return TensorRTRunner(build_plan(onnx_path, tmp_path / "tiny.plan"), GRAPH)


FACTORIES = {
    "torch": make_torch,
    "onnxruntime-cpu": make_ort_cpu,
    "onnxruntime-cuda": make_ort_cuda,
    "tensorrt": make_tensorrt,
}
COVERED = {TorchRunner: "torch", OnnxRuntimeRunner: "onnxruntime-cpu", TensorRTRunner: "tensorrt"}


def all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def test_every_runner_subclass_is_in_the_contract_test():
    assert set(all_subclasses(Runner)) <= set(COVERED), "a new Runner subclass needs a factory in FACTORIES"


@pytest.fixture(params=sorted(FACTORIES))
def runner(request, onnx_path, tmp_path):
    return FACTORIES[request.param](onnx_path, tmp_path)


def feed(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((2, 3, 4), dtype=np.float32),
        "scale": np.array([1.5 + seed], np.float32),
    }


def reference(f):
    with torch.no_grad():
        y, total = Tiny()(torch.from_numpy(f["x"]), torch.from_numpy(f["scale"]))
    return {"y": y.numpy(), "total": total.numpy()}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_state_is_checked(runner):
    with pytest.raises(RunnerError, match="before activate"):
        runner.infer(feed())
    with pytest.raises(RunnerError, match="before activate"):
        runner.bind()
    with pytest.raises(RunnerError, match="not active"):
        runner.deactivate()
    with runner:
        assert runner.is_active
        with pytest.raises(RunnerError, match="already active"):
            runner.activate()
    assert not runner.is_active
    with pytest.raises(RunnerError, match="before activate"):
        runner.infer(feed())


def test_inputs_are_checked(runner):
    good = feed()
    with runner:
        with pytest.raises(RunnerError, match=r"missing \['scale'\]"):
            runner.infer({"x": good["x"]})
        with pytest.raises(RunnerError, match=r"unexpected \['bogus'\]"):
            runner.infer({**good, "bogus": good["x"]})
        with pytest.raises(RunnerError, match=r"'x' has shape \[2, 3, 5\].*\[2, 3, 4\]"):
            runner.infer({**good, "x": np.zeros((2, 3, 5), np.float32)})
        with pytest.raises(RunnerError, match=r"'x' is float64.*float32"):
            runner.infer({**good, "x": good["x"].astype(np.float64)})
        with pytest.raises(RunnerError, match="numpy array"):
            runner.infer({**good, "scale": [1.0]})
        with pytest.raises(RunnerError, match=r"buffer for 'x' is \[3\]"):
            runner.bind({"x": runner.allocate((3,))})
        with pytest.raises(RunnerError, match="has no tensors"):
            runner.bind({"nope": runner.allocate((3,))})


def test_outputs_are_named_and_match_the_reference(runner):
    with runner:
        for seed in (0, 1):  # the second call reuses the runner's buffers
            f = feed(seed)
            out = runner.infer(f)
            assert list(out) == ["y", "total"]
            expect = reference(f)
            for name, spec in GRAPH.tensors.items():
                if name in out:
                    assert out[name].shape == spec.shape and out[name].dtype == np.float32
                    assert rel(out[name], expect[name]) < TOL, name


def test_bound_buffers_are_reused_and_rebinding_moves_no_data(runner):
    f0, f1 = feed(0), feed(1)
    with runner:
        b = runner.bind()
        pointers = {name: buf.ptr for name, buf in b.buffers.items()}
        other_x = runner.allocate((2, 3, 4))
        runner.write(b["x"], f0["x"])
        runner.write(b["scale"], f0["scale"])
        runner.write(other_x, f1["x"])
        runner.run(b)
        assert rel(runner.read(b["y"]).copy(), reference(f0)["y"]) < TOL
        b.set("x", other_x)  # rebind to a preallocated buffer: the next run reads it
        runner.run(b)
        expect = reference({"x": f1["x"], "scale": f0["scale"]})
        assert rel(runner.read(b["total"]), expect["total"]) < TOL
        assert {n: buf.ptr for n, buf in b.buffers.items()} == {**pointers, "x": other_x.ptr}
        with pytest.raises(RunnerError, match="ping-pong"):
            runner.bind({"x": b["x"], "y": _alias(b["x"])})
        with pytest.raises(RunnerError, match="ping-pong"):
            b.set("y", _alias(b["x"]))
        with pytest.raises(RunnerError, match="belongs to runner"):
            runner.run(_foreign_binding())


def _alias(x):
    """A buffer of y's shape laid over the memory of x: an output overwriting an input."""
    return type(x)((2, 3, 5), "float32", x.device, x.ptr, None, x.owner)


def _foreign_binding():
    r = TorchRunner(Tiny(), GRAPH).activate()
    return r.bind()


def test_declared_io_must_match_the_onnx_graph(onnx_path):
    wrong = GraphSpec("tiny", GRAPH.inputs, (TensorSpec("y", (2, 3, 6), "float32"), GRAPH.outputs[1]))
    with pytest.raises(
        RunnerError, match=r"output 'y': declared \[2, 3, 6\] float32, the graph has \[2, 3, 5\]"
    ):
        OnnxRuntimeRunner(onnx_path, wrong).activate()
    inferred = OnnxRuntimeRunner(onnx_path).activate()  # no declared IO: taken from the session
    assert inferred.graph.compare(GRAPH) == []


def test_tensorrt_runner_without_tensorrt_names_the_extra(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the error where it is not")
    except ImportError:
        pass
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"not a plan")
    runner = TensorRTRunner(plan, GRAPH)  # constructing needs nothing
    with pytest.raises(MissingDependencyError, match=r"'tensorrt'.*rf_runtime\[gpu\]"):
        runner.activate()
    assert not runner.is_active
    assert issubclass(MissingDependencyError, RFError)


def test_cuda_results_are_checked():
    assert check_cuda((0, 7), "f") == 7
    assert check_cuda((0, 1, 2), "f") == (1, 2)
    with pytest.raises(RunnerError, match="cudaMalloc failed with 2"):
        check_cuda((2, None), "cudaMalloc")
