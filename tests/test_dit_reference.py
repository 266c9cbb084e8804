"""Parity of the PyTorch reference generator with the public Reward Forcing implementation.

The golden tensors in ``tests/golden/dit_stream_tiny.safetensors`` were produced by running the
public Reward Forcing code (``wan/modules/causal_model.py`` with the streaming loop of
``pipeline/causal_inference.py``, commit 4317f5a "[fix] ema sink") in fp32 on CPU, with attention
routed through PyTorch SDPA in the input dtype (SPEC section 7), ``local_attn_size=9``,
``sink_size=3``, ``num_frame_per_block=3``, denoising steps [1000, 750, 500, 250] warped, and its
``torch.randn_like`` re-noise replaced by the recorded ``renoise`` tensors. Models are 2-layer
random-weight configs (seed 7 and 11) on non-square latents; 8 and 9 chunks, so the cache fills,
evicts and folds into the sink 6 and 7 times. ``dit_full_tiny.safetensors`` is Wan2.1's
bidirectional ``WanModel`` forward on the first model's weights.
"""

import pytest
import torch
from safetensors.torch import load_file

from rf_runtime.models import CausalDiT, DiTConfig
from rf_runtime.models.rollout import generate_latents
from rf_runtime.sampler import StreamSettings

TOL = 1e-4  # relative error ||a - b|| / ||b|| against the fp32 reference

CFG1 = DiTConfig(dim=64, ffn_dim=96, freq_dim=32, text_dim=24, text_len=20, num_heads=4, num_layers=2)
CFG2 = DiTConfig(dim=48, ffn_dim=64, freq_dim=16, text_dim=8, text_len=16, num_heads=2, num_layers=2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def golden():
    import os

    return load_file(os.path.join(os.path.dirname(__file__), "golden", "dit_stream_tiny.safetensors"))


def model_from(golden, prefix, cfg):
    # the release wraps keys with "model." (rewardforcing.pt); the loader strips it
    sd = {"model." + k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
    return CausalDiT.from_state_dict(sd, cfg).eval()


@pytest.mark.parametrize("tag,alpha", [("a0999", 0.999), ("a05", 0.5)])
def test_stream_matches_reward_forcing(golden, tag, alpha):
    model = model_from(golden, "sd.", CFG1)
    settings = StreamSettings(
        chunk_frames=3,
        sink_frames=3,
        window_frames=6,
        ema_alpha=alpha,
        timesteps=(1000, 750, 500, 250),
        shift=5.0,
        warp=True,
    )
    ref = golden[f"{tag}.x0"]
    x0 = generate_latents(
        model, golden[f"{tag}.text"], golden[f"{tag}.noise"], golden[f"{tag}.renoise"], settings
    )
    assert x0.shape == ref.shape == (1, 24, 16, 6, 8)
    for i in range(8):  # every chunk, not only the total
        sl = slice(3 * i, 3 * i + 3)
        assert rel(x0[:, sl], ref[:, sl]) < TOL, f"chunk {i}"


def test_stream_batch2_other_geometry(golden):
    model = model_from(golden, "sd2.", CFG2)
    x0 = generate_latents(
        model, golden["b2.text"], golden["b2.noise"], golden["b2.renoise"], StreamSettings(ema_alpha=0.9)
    )
    assert rel(x0, golden["b2.x0"]) < TOL


def test_parity_is_sensitive_to_alpha(golden):
    """The golden data distinguishes EMA rates: a model with the wrong alpha fails the tolerance."""
    model = model_from(golden, "sd.", CFG1)
    x0 = generate_latents(
        model, golden["a05.text"], golden["a05.noise"], golden["a05.renoise"], StreamSettings(ema_alpha=0.999)
    )
    assert rel(x0, golden["a05.x0"]) > 10 * TOL


def test_full_forward_matches_wan(golden):
    import os

    full = load_file(os.path.join(os.path.dirname(__file__), "golden", "dit_full_tiny.safetensors"))
    model = model_from(golden, "sd.", CFG1)
    with torch.no_grad():
        flow = model.forward_full(full["x"].transpose(1, 2), full["t"], full["text"])
    assert rel(flow, full["flow"].transpose(1, 2)) < TOL
