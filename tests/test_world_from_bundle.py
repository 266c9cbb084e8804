"""Weights taken back out of an exported bundle equal the model directory's (DiT and VAE decoder)."""

import os

import pytest
import torch

from rf_runtime.errors import InputError
from rf_runtime.models import CausalDiT
from rf_runtime.models.vae import WanVAE
from rf_runtime.world import training as T
from rf_runtime.world.from_bundle import dit_from_bundle, vae_from_bundle

CFG = T.TINY


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from rf_runtime.export.bundle_builder import build_bundle

    torch.manual_seed(3)
    dit = CausalDiT(CFG.dit).eval()
    for p in dit.parameters():  # random everywhere (zero-initialised heads would hide a wrong mapping)
        p.data.normal_(0.0, 0.2)
    vae_cfg = type(CFG.vae)(
        **{**CFG.vae.__dict__, "latents_mean": (0.1, -0.2, 0.3, 0.0), "latents_std": (0.5, 2.0, 1.0, 1.5)}
    )
    vae = WanVAE(vae_cfg).eval()
    # trained weights differ (the exporter merges equal tensors, e.g. unit norm gains)
    for p in vae.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    root = tmp_path_factory.mktemp("fb")
    T.write_model_dir(str(root / "model"), CFG, dit, vae, {"training_stage": "random"})
    return dit, vae, build_bundle(root / "model", root / "bundle")


def test_the_dit_comes_back_exactly(made):
    dit, _, bundle = made
    got = dit_from_bundle(str(bundle), CFG.dit).state_dict()
    want = dit.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_a_vae_exported_with_2d_convolutions_is_refused_with_the_fix(made):
    # the current exporter (2-D convolutions) stores the decoder's weights unnamed: refused, naming the way out
    _, _, bundle = made
    with pytest.raises(InputError, match="model directory"):
        vae_from_bundle(str(bundle), CFG.vae)


def test_the_shipped_bundle_is_the_committed_model_directory():
    """The default bundle is exported from checkpoints/procedural-world/model (the one documented
    command): streaming both gives the same frames, so the committed folder is what ships and
    training can continue from it."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from rf_runtime.bundle import default_engine_dir
    from rf_runtime.streamer import Streamer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = os.path.join(root, "checkpoints", "procedural-world", "model")
    a = np.concatenate(
        list(Streamer.from_checkpoint(model).stream("a red circle bouncing", seed=0, num_frames=24))
    )
    b = np.concatenate(
        list(
            Streamer.from_engine(default_engine_dir()).stream("a red circle bouncing", seed=0, num_frames=24)
        )
    )
    assert a.shape == b.shape == (24, 64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # uint8 levels: fp32 PyTorch vs onnxruntime


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(InputError, match="exported bundle"):
        dit_from_bundle(str(tmp_path), CFG.dit)
