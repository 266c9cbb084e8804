"""Schedule, sampling math, the chunk loop's fixed memory and its input checks."""

import numpy as np
import pytest
import torch

from rf_runtime.errors import ConfigError, InputError
from rf_runtime.models import CausalDiT, DiTConfig
from rf_runtime.models.rollout import ChunkRollout, generate_latents
from rf_runtime.sampler import StreamSettings, chunk_noise, flow_schedule, renoise, x0_from_flow

TINY = DiTConfig(dim=32, ffn_dim=48, freq_dim=16, text_dim=8, text_len=8, num_heads=2, num_layers=2)


def _chunk(roll, x, eps):
    """One chunk by hand: every denoising step, then the clean-context pass."""
    x0 = roll.denoise(x, eps)
    roll.cache_pass(x0)
    return x0


def test_warped_timesteps():
    sched = flow_schedule(StreamSettings())
    # sigma' = 5 s / (1 + 4 s) at s = 1, 0.75, 0.5, 0.25
    assert np.allclose(sched.t, [1000.0, 937.5, 2500 / 3, 625.0], atol=1e-3)
    assert np.allclose(sched.sigma, [1.0, 0.9375, 5 / 6, 0.625], atol=1e-6)


def test_unwarped_timesteps_use_nearest_sigma():
    sched = flow_schedule(StreamSettings(warp=False))
    assert sched.t == (1000.0, 750.0, 500.0, 250.0)
    # the table entry nearest t=500 has sigma 0.5 +- one table step
    assert abs(sched.sigma[2] - 0.5) < 2e-3


def test_x0_and_renoise_roundtrip():
    x0, eps = np.random.default_rng(0).standard_normal((2, 5))
    sigma = 0.8333
    xt = renoise(x0, eps, sigma)
    flow = eps - x0  # the network's target
    assert np.allclose(x0_from_flow(xt, flow, sigma), x0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CausalDiT(TINY).eval()


def test_cache_memory_constant_over_50_chunks():
    model = tiny_model()
    settings = StreamSettings(timesteps=(1000,))  # one step keeps the test fast; the cache path is the same
    text = torch.randn(1, 5, TINY.text_dim)
    roll = ChunkRollout.for_prompt(model, text, (1, 3, 16, 4, 4), settings)
    ptr_k, ptr_v, shape = roll.cache_k.data_ptr(), roll.cache_v.data_ptr(), roll.cache_k.shape
    with torch.no_grad():
        for _ in range(50):
            _chunk(roll, torch.randn(1, 3, 16, 4, 4), torch.zeros(0, 1, 3, 16, 4, 4))
    assert roll.chunks_committed == 50
    assert (
        roll.cache_k.shape == shape and roll.cache_k.data_ptr() == ptr_k and roll.cache_v.data_ptr() == ptr_v
    )
    # 2 layers x (3 sink + 3 window) frames x 4 tokens x 2 heads x 16 dims
    assert roll.cache_k.numel() == 2 * 6 * 4 * 2 * 16
    assert torch.isfinite(roll.cache_k).all()


def test_ema_alpha_one_equals_static_sink_and_differs_from_ema():
    model = tiny_model(1)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 5, TINY.text_dim, generator=g)
    noise = torch.randn(1, 15, 16, 4, 4, generator=g)
    ren = torch.randn(3, 1, 15, 16, 4, 4, generator=g)
    static = generate_latents(model, text, noise, ren, StreamSettings(ema_alpha=1.0))
    # a static sink: the sink keys are chunk 0's for the whole stream; check against a manual
    # rollout that never folds (window-only commits after chunk 0)
    roll = ChunkRollout.for_prompt(model, text, noise.shape, StreamSettings(ema_alpha=1.0))
    with torch.no_grad():
        first = _chunk(roll, noise[:, :3], ren[:, :, :3])
        sink = roll.cache_k[:, :, : 3 * 4].clone()
        for i in range(1, 5):
            _chunk(roll, noise[:, 3 * i : 3 * i + 3], ren[:, :, 3 * i : 3 * i + 3])
    assert torch.equal(roll.cache_k[:, :, : 3 * 4], sink)
    assert torch.allclose(first, static[:, :3])
    ema = generate_latents(model, text, noise, ren, StreamSettings(ema_alpha=0.5))
    assert torch.allclose(ema[:, :9], static[:, :9])  # identical until the first fold
    assert not torch.allclose(ema[:, 9:], static[:, 9:], atol=1e-4)


def test_bad_inputs():
    model = tiny_model()
    text = torch.randn(1, 5, TINY.text_dim)
    with pytest.raises(InputError, match="multiple of chunk_frames"):
        generate_latents(model, text, torch.randn(1, 4, 16, 4, 4), torch.randn(3, 1, 4, 16, 4, 4))
    with pytest.raises(InputError, match="renoise"):
        generate_latents(model, text, torch.randn(1, 3, 16, 4, 4), torch.randn(2, 1, 3, 16, 4, 4))
    with pytest.raises(InputError, match="text_len"):
        generate_latents(
            model,
            torch.randn(1, 9, TINY.text_dim),
            torch.randn(1, 3, 16, 4, 4),
            torch.randn(3, 1, 3, 16, 4, 4),
        )
    with pytest.raises(InputError, match="noise must be"):
        generate_latents(model, text, torch.randn(1, 3, 8, 4, 4), torch.randn(3, 1, 3, 8, 4, 4))
    with pytest.raises(ConfigError, match="ema_alpha"):
        StreamSettings(ema_alpha=1.01)
    with pytest.raises(ConfigError, match="timesteps"):
        StreamSettings(timesteps=(1000, 0))


def test_chunk_noise_in_place_draws_the_same_sequence():
    """Refilling the same arrays chunk after chunk gives the draws of fresh arrays, bit for bit (the
    streamer relies on it: the video of a seed must not depend on where the noise is drawn into)."""
    settings = StreamSettings()
    shape = (1, settings.chunk_frames, 4, 5, 6)
    fresh_rng = np.random.Generator(np.random.PCG64(7))
    rng = np.random.Generator(np.random.PCG64(7))
    out = chunk_noise(rng, settings, (1, 4, 5, 6))
    arrays = [id(a) for a in out]
    for chunk in range(3):
        if chunk:
            out = chunk_noise(rng, settings, (1, 4, 5, 6), out)
        init = fresh_rng.standard_normal(shape, dtype=np.float32)
        renoise = fresh_rng.standard_normal((settings.num_steps - 1, *shape), dtype=np.float32)
        np.testing.assert_array_equal(out[0], init)
        np.testing.assert_array_equal(out[1], renoise)
        assert [id(a) for a in out] == arrays  # filled in place
