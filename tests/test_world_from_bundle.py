"""Weights taken back out of an exported bundle equal the model directory's (DiT and VAE decoder)."""

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
    vae_cfg = type(CFG.vae)(**{**CFG.vae.__dict__, "latents_mean": (0.1, -0.2, 0.3, 0.0),
                               "latents_std": (0.5, 2.0, 1.0, 1.5)})
    vae = WanVAE(vae_cfg).eval()
    for p in vae.parameters():  # trained weights differ (the exporter merges equal tensors, e.g. unit norm gains)
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


def test_the_vae_decoder_and_its_normalisation_come_back_and_the_encoder_is_fresh(made):
    _, vae, bundle = made
    got = vae_from_bundle(str(bundle), CFG.vae)
    assert got.config.latents_mean == pytest.approx(vae.config.latents_mean, abs=1e-6)
    assert got.config.latents_std == pytest.approx(vae.config.latents_std, rel=1e-6)
    want, have = vae.state_dict(), got.state_dict()
    for k, v in want.items():
        if k.startswith(("decoder.", "conv2.")):
            torch.testing.assert_close(have[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(have["conv1.weight"], want["conv1.weight"])
    z = torch.randn(1, CFG.vae.z_dim, 3, *CFG.latent_hw)
    with torch.no_grad():
        torch.testing.assert_close(got.decode(z), vae.decode(z), rtol=0, atol=1e-6)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(InputError, match="exported bundle"):
        dit_from_bundle(str(tmp_path), CFG.dit)
