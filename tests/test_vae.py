"""The Wan VAE port: golden parity with Wan2.1's reference VAE, and streaming decode == full decode.

``tests/golden/vae_tiny.safetensors`` was produced with Wan2.1's reference ``WanVAE_``
(``wan/modules/vae.py``) in fp32 on CPU: config dim=8, z_dim=16, dim_mult=(1, 2, 2, 2),
num_res_blocks=1, temporal downsample (False, True, True), random weights (seed 3, N(0, 0.2),
norm gains 1 + N(0, 0.1)); decode of 5 latent frames of 4x6 (with the Wan2.1 latent mean/std,
clamped to [-1, 1]) and encode of 9 pixel frames of 32x48.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from rf_runtime.errors import CheckpointError, InputError
from rf_runtime.models import VAEConfig, WanVAE

TOL = 1e-4  # relative error against the fp32 reference
CFG = VAEConfig(
    dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temperal_downsample=(False, True, True)
)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def golden():
    return load_file(os.path.join(os.path.dirname(__file__), "golden", "vae_tiny.safetensors"))


@pytest.fixture(scope="module")
def vae(golden):
    sd = {k[3:]: v for k, v in golden.items() if k.startswith("sd.")}
    return WanVAE.from_state_dict(sd, CFG).eval()


def test_decode_matches_wan(vae, golden):
    with torch.no_grad():
        pixels = vae.decode(golden["z"])
    assert pixels.shape == (1, 3, 17, 32, 48)  # 1 + 4 (F - 1) frames, 8x spatial
    assert rel(pixels, golden["pixels"]) < TOL
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_encode_matches_wan(vae, golden):
    with torch.no_grad():
        mu = vae.encode(golden["enc_in"])
    assert mu.shape == (1, 16, 3, 4, 6)
    assert rel(mu, golden["enc_out"]) < TOL


@pytest.mark.parametrize("chunks", [(3, 3, 3), (1, 3, 3, 2), (2, 1, 1, 1, 4)])
def test_streaming_decode_equals_full(vae, chunks):
    torch.manual_seed(0)
    z = torch.randn(1, 16, sum(chunks), 4, 6)
    with torch.no_grad():
        full = vae.decode(z)
        dec = vae.stream_decoder(1)
        parts, start = [], 0
        for n in chunks:
            parts.append(dec.decode_chunk(z[:, :, start : start + n]))
            start += n
    assert [p.shape[2] for p in parts] == [1 + 4 * (chunks[0] - 1)] + [4 * n for n in chunks[1:]]
    assert torch.allclose(torch.cat(parts, dim=2), full, atol=1e-5)
    dec.reset()  # reusable: a reset decoder starts a new stream
    with torch.no_grad():
        again = dec.decode_chunk(z[:, :, :3])
    assert torch.allclose(again, full[:, :, :9], atol=1e-5)


def test_release_state_dict_shapes_on_meta():
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    # Wan2.1's reference WanVAE_ (dim 96, z 16, mult 1,2,4,4) built on meta has 126,892,531 parameters
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert VAEConfig().stride == (4, 8, 8)
    keys = vae.state_dict().keys()
    assert {
        "conv1.weight",
        "conv2.bias",
        "decoder.upsamples.3.time_conv.weight",
        "encoder.head.2.weight",
    } <= set(keys)


def test_wrong_keys_raise(golden):
    sd = {k[3:]: v for k, v in golden.items() if k.startswith("sd.")}
    sd["decoder.conv1.weight"] = sd["decoder.conv1.weight"][:1]
    with pytest.raises(CheckpointError, match="decoder.conv1.weight"):
        WanVAE.from_state_dict(sd, CFG)


def test_bad_input(vae):
    with pytest.raises(InputError, match="latents must be"):
        vae.decode(torch.zeros(1, 8, 2, 4, 6))
    with pytest.raises(InputError, match="pixels"):
        vae.encode(torch.zeros(1, 3, 4, 32, 48))
