"""The umT5 text encoder graph (export/text_graph.py) and the torch-free runtime encoder
(rf_runtime/text_onnx.py) against the PyTorch UMT5TextEncoder, on the tiny umT5 of
tests/test_text_encoder.py (Wan's key names, golden weights) with text_len 512 as SPEC section 5.
Tolerance: relative error ||onnx - torch|| / ||torch|| < 1e-4 (fp32); padding positions exactly 0.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from rf_runtime.export.text_graph import DATA_FILE, GRAPH_FILE, export_text_encoder  # noqa: E402
from rf_runtime.bundle import BundleError  # noqa: E402
from rf_runtime.errors import ConfigError, InputError  # noqa: E402
from rf_runtime.text.umt5 import WAN_T5_FILE, UMT5TextEncoder  # noqa: E402
from rf_runtime.runners import OnnxRuntimeRunner  # noqa: E402
from rf_runtime.text.umt5_onnx import OnnxTextEncoder  # noqa: E402
from tests.test_export_precision import assert_ops_supported  # noqa: E402
from tests.test_text_encoder import GOLDEN, make_tokenizer  # noqa: E402

TOL = 1e-4
TEXT_LEN = 512
PROMPTS = [
    "a red cat jumps over the dog",
    "  The   blue\tball &amp; the \u201cgreen\u201d field\n",  # whitespace, HTML entity, curly quotes: cleaned
    " ".join(["a red cat runs under the blue sky at night in the rain"] * 50),  # > 512 tokens: truncated
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("umt5")
    wan_sd = {k[3:]: v for k, v in load_file(GOLDEN).items() if k.startswith("sd.")}
    torch.save(wan_sd, root / WAN_T5_FILE)
    make_tokenizer(root / "google" / "umt5-xxl")
    encoder = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN)
    bundle = root / "bundle"
    bundle.mkdir()
    result = export_text_encoder(encoder, str(bundle))
    return encoder, bundle, result


def test_graph_with_external_data_and_tokenizer(exported):
    encoder, bundle, result = exported
    assert set(result["files"]) >= {"text_encoder", "text_encoder_data", "tokenizer/tokenizer.json"}
    for entry in result["files"].values():
        assert (bundle / entry["path"]).is_file()
    assert sorted(os.listdir(bundle)) == sorted([GRAPH_FILE, DATA_FILE, "tokenizer"])  # no stray files
    params = sum(p.numel() for p in encoder.model.parameters())
    assert os.path.getsize(bundle / DATA_FILE) >= 4 * params * 0.9  # the fp32 weights live in the data file
    assert os.path.getsize(bundle / GRAPH_FILE) < os.path.getsize(bundle / DATA_FILE) / 4
    assert result["spec"] == {
        "kind": "umt5",
        "graph": "text_encoder",
        "tokenizer": "tokenizer",
        "text_len": TEXT_LEN,
        "text_dim": 32,
    }
    model = onnx.load(str(bundle / GRAPH_FILE))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert_ops_supported(model, GRAPH_FILE)


def test_onnx_encoder_matches_torch(exported):
    encoder, bundle, result = exported
    onnx_enc = OnnxTextEncoder(str(bundle / GRAPH_FILE), str(bundle / result["spec"]["tokenizer"]), TEXT_LEN)
    ids, mask = onnx_enc.tokenize(PROMPTS)
    ref_ids, ref_mask = encoder.tokenize(PROMPTS)
    assert np.array_equal(ids, ref_ids.numpy()) and np.array_equal(mask, ref_mask.numpy())
    assert mask[2].sum() == TEXT_LEN and ids[2, -1] == 1  # truncated, EOS kept last
    got = onnx_enc.encode(PROMPTS)
    with torch.no_grad():
        expect = encoder.encode(PROMPTS).numpy()
    assert got.shape == expect.shape == (3, TEXT_LEN, 32) and got.dtype == np.float32
    assert float(np.linalg.norm(got - expect) / np.linalg.norm(expect)) < TOL
    for b, n in enumerate(mask.sum(1)):
        assert np.all(got[b, n:] == 0.0) and np.all(np.abs(got[b, :n]).sum(-1) > 0)


def test_onnx_encoder_does_not_import_torch(exported):
    _, bundle, result = exported
    code = (
        "import sys, json; from rf_runtime.text.umt5_onnx import OnnxTextEncoder; "
        "e = OnnxTextEncoder(sys.argv[1], sys.argv[2], 512); out = e.encode(['a red cat']); "
        "assert out.shape == (1, 512, 32), out.shape; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundle / GRAPH_FILE), str(bundle / "tokenizer")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_onnx_encoder_errors(exported, tmp_path):
    _, bundle, result = exported
    enc = OnnxTextEncoder(str(bundle / GRAPH_FILE), str(bundle / "tokenizer"), TEXT_LEN)
    with pytest.raises(InputError, match="empty"):
        enc.encode(["  \n "])
    with pytest.raises(InputError, match="must be a string"):
        enc.encode([3])
    with pytest.raises(ConfigError, match="tokenizer.json is missing.*rf-export onnx"):
        OnnxTextEncoder(str(bundle / GRAPH_FILE), str(tmp_path), TEXT_LEN)
    with pytest.raises(ConfigError, match="text_len=16"):
        OnnxTextEncoder(str(bundle / GRAPH_FILE), str(bundle / "tokenizer"), 16)


def write_umt5_model_dir(path, t5_dir):
    """The tiny model directory of rf_runtime.testing, with the tiny umT5 (text_dim 32, 512 tokens)
    as its text encoder instead of the hashed one."""
    from safetensors.torch import save_file

    from rf_runtime.models import CausalDiT, DiTConfig
    from rf_runtime.testing import DIT, write_model_dir

    write_model_dir(path, seed=3)
    cfg = DiTConfig(**{**DIT.to_dict(), "text_dim": 32, "text_len": TEXT_LEN})
    torch.manual_seed(3)
    dit = CausalDiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.15)
    (path / "config.json").write_text(json.dumps(dict(cfg.to_dict(), _class_name="WanModel")))
    save_file(dit.state_dict(), path / "diffusion_pytorch_model.safetensors")
    card = json.loads((path / "rf_runtime.json").read_text())
    del card["text_encoder"]  # default: Wan's umT5 files in the model directory
    (path / "rf_runtime.json").write_text(json.dumps(card))
    shutil.copy(t5_dir / WAN_T5_FILE, path / WAN_T5_FILE)
    shutil.copytree(t5_dir / "google", path / "google")
    return path


def test_umt5_bundle_streams_like_the_checkpoint(exported, tmp_path):
    """rf-export onnx on a umT5 model: the bundle holds the text graph and tokenizer, streams through
    onnxruntime to the torch Streamer's frames, and `rf-export verify` passes on its text graph."""
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.export.verify import verify_bundle
    from rf_runtime import Streamer

    _, bundle, _ = exported
    model = write_umt5_model_dir(tmp_path / "model", bundle.parent)
    out = build_bundle(model, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["text_encoder"]["kind"] == "umt5"
    assert {"text_encoder", "text_encoder_data", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    # schema 2: the text graph declares its IO and its external-data file; every file is hashed
    graph = manifest["graphs"]["text_encoder"]
    assert graph["file"] == "text_encoder" and graph["external_data"] == ["text_encoder_data"]
    assert graph["precision"] == "fp32"
    assert graph["inputs"] == [
        {"name": n, "shape": [1, TEXT_LEN], "dtype": "int64"} for n in ("input_ids", "attention_mask")
    ]
    assert graph["outputs"] == [{"name": "text_embeds", "shape": [1, TEXT_LEN, 32], "dtype": "float32"}]
    on_disk = {str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()}
    assert {f["path"] for f in manifest["files"].values()} == on_disk - {"manifest.json"}
    for f in manifest["files"].values():
        data = (tmp_path / "bundle" / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["model_card"]["source"] == "model"  # a basename, no machine path
    prompt = "a red cat jumps over the dog"
    ref = np.concatenate(list(Streamer.from_checkpoint(model).stream(prompt, seed=1, num_frames=21)))
    engine = Streamer.from_engine(out)
    assert isinstance(
        engine.backend.text_encoder.runner, OnnxRuntimeRunner
    )  # the same runners as every graph
    got = np.concatenate(list(engine.stream(prompt, seed=1, num_frames=21)))
    assert got.shape == ref.shape == (21, 32, 48, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    rows = verify_bundle(out, model, backends=["onnxruntime-cpu"], graphs=["text_encoder"])
    assert [(r.graph, r.status) for r in rows] == [("text_encoder", "PASS")] and rows[0].rel < TOL

    # the engine runs a umT5 bundle without torch: tokenizers + the text graph through the runner
    code = (
        "import sys; from rf_runtime.backends.engine import EngineBackend; "
        "be = EngineBackend.load(sys.argv[1]); k, v = be.encode_prompt('a red cat'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"

    # the text encoder section must name a graph and a listed tokenizer
    broken = tmp_path / "broken"
    for edit, message in (
        (lambda m: m["text_encoder"].update(graph="umt5"), "text_encoder graph 'umt5' is not in"),
        (lambda m: m["files"].pop("tokenizer/tokenizer.json"), "tokenizer/tokenizer.json is not in"),
    ):
        shutil.copytree(out, broken)
        m = json.loads((broken / "manifest.json").read_text())
        edit(m)
        (broken / "manifest.json").write_text(json.dumps(m))  # as edited: no hashes recomputed
        with pytest.raises(BundleError, match=f"{message}.*rf-export onnx"):
            Streamer.from_engine(broken)
        shutil.rmtree(broken)

    # a missing or altered external-data file is refused by name
    data = tmp_path / "bundle" / DATA_FILE
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(BundleError, match=r"text_encoder\.onnx\.data.*rf-export onnx"):
        Streamer.from_engine(out)
