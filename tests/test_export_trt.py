"""`rf-export trt`: argument checks and the missing-TensorRT error run here; the build itself
needs TensorRT and an NVIDIA GPU and is skipped where they are absent (no fake TensorRT)."""

import importlib.util
import json

import pytest

pytest.importorskip("onnx")

from rf_runtime.export.bundle_builder import build_bundle  # noqa: E402
from rf_runtime.export.cli import main  # noqa: E402
from rf_runtime.testing import write_model_dir  # noqa: E402

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    write_model_dir(root / "model", seed=9)
    build_bundle(root / "model", root / "bundle")  # fp32 graphs only
    return root / "model", root / "bundle"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-dependency message cannot show")
def test_without_tensorrt_says_what_to_install(dirs, capsys):
    assert main(["trt", str(dirs[1]), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "rf_runtime[gpu]" in err and "NVIDIA GPU" in err
    assert "plans" not in json.loads((dirs[1] / "manifest.json").read_text())  # nothing written


def test_arguments_are_checked_before_tensorrt(dirs, tmp_path, capsys):
    # the default precision is fp16, which this fp32-only bundle lacks: the message gives the rebuild command
    assert main(["trt", str(dirs[1])]) == 2
    err = capsys.readouterr().err
    assert "no fp16 graphs" in err and "--precision fp32,fp16" in err
    assert main(["trt", str(dirs[1]), "--precision", "fp32", "--graphs", "dit_step,unet"]) == 2
    assert "['unet']" in capsys.readouterr().err
    assert main(["trt", str(tmp_path)]) == 2
    assert "not an engine bundle" in capsys.readouterr().err
    for bad in (["--workspace-mib", "0"], ["--workspace-mib", "lots"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit) as e:
            main(["trt", str(dirs[1]), *bad])
        assert e.value.code == 2


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU")
def test_build_fp16_plans_and_verify(dirs, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    import tensorrt as trt

    from rf_runtime.export.verify import verify_bundle

    bundle = tmp_path / "bundle"
    build_bundle(dirs[0], bundle, precisions=("fp32", "fp16"))
    assert main(["trt", str(bundle), "--precision", "fp16", "--workspace-mib", "1024"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    major, minor = torch.cuda.get_device_capability(0)
    assert set(manifest["plans"]) == {
        "dit_step@fp16",
        "cache_update@fp16",
        "text_kv@fp16",
        "vae_decode_first@fp16",
        "vae_decode@fp16",
    }
    for entry in manifest["plans"].values():
        assert (
            entry["tensorrt_version"] == trt.__version__ and entry["compute_capability"] == f"{major}.{minor}"
        )
        assert (bundle / manifest["files"][entry["file"]]["path"]).is_file()
    assert len(list(tmp_path.glob(f"tensorrt-timing-{trt.__version__}-sm{major}{minor}-*.cache"))) == 1
    rows = verify_bundle(bundle, dirs[0], backends=["tensorrt"])
    assert all(r.status == "PASS" for r in rows if r.precision == "fp16"), rows
