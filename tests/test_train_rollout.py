"""The Self-Forcing rollout runs the inference cache code and puts the gradient at the exit step only."""

import dataclasses

import pytest
import torch

from rf_runtime.errors import InputError
from rf_runtime.models.rollout import ChunkRollout, generate_latents
from rf_runtime.sampler import StreamSettings
from rf_runtime.testing import tiny_dit
from rf_runtime.train.rollout import sample_exit_step, self_forcing_rollout, training_settings

B, F, C, H, W = 2, 12, 16, 4, 6  # 4 chunks: with 3 sink + 6 window frames, chunk 3 sees a folded sink


@pytest.fixture(scope="module")
def setup():
    model = tiny_dit(0)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(B, 5, model.config.text_dim, generator=g)
    noise = torch.randn(B, F, C, H, W, generator=g)
    ren = torch.randn(3, B, F, C, H, W, generator=g)
    return model, text, noise, ren


@pytest.mark.parametrize("exit_step", [0, 1, 3])
def test_rollout_equals_inference_stopped_at_the_exit_step(setup, exit_step):
    """Exiting at step k is the inference sampler with the first k+1 steps (same schedule, same cache)."""
    model, text, noise, ren = setup
    settings = StreamSettings(ema_alpha=0.5)
    x0 = self_forcing_rollout(model, text, noise, ren, settings, exit_step, with_grad=False)
    short = dataclasses.replace(settings, timesteps=settings.timesteps[: exit_step + 1])
    expected = generate_latents(model, text, noise, ren[:exit_step], short)
    assert torch.allclose(x0, expected, rtol=1e-5, atol=1e-6)


def test_gradient_flows_only_through_each_exit_step(setup):
    """d(sum(x0 of chunk 2 * R)) / d(params) equals the gradient of ONE forward of chunk 2's exit step
    on constant inputs (its noisy latents and the cache, computed without gradient)."""
    model, text, noise, ren = setup
    settings, k = StreamSettings(), 2
    target = torch.randn(B, 3, C, H, W, generator=torch.Generator().manual_seed(5))
    model.zero_grad()
    x0 = self_forcing_rollout(model, text, noise, ren, settings, k)
    (x0[:, 6:9] * target).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    with torch.no_grad():
        roll = ChunkRollout.for_prompt(model, text, noise.shape, settings)
        for i in range(2):
            fr = slice(3 * i, 3 * i + 3)
            x = noise[:, fr]
            for s in range(k):
                _, x = roll.denoise_step(x, s, ren[s][:, fr])
            x0_i, _ = roll.denoise_step(x, k, None)
            roll.cache_pass(x0_i)
        x = noise[:, 6:9]
        for s in range(k):
            _, x = roll.denoise_step(x, s, ren[s][:, 6:9])
    roll.text_k, roll.text_v = model.text_kv(text)  # the text conditioning keeps its gradient
    x0_2, _ = roll.denoise_step(x, k, None)
    (x0_2 * target).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert any(g.abs().sum() > 0 for g in got.values())


def test_fold_in_training_changes_chunks_after_the_first_eviction(setup):
    model, text, noise, ren = setup
    settings = StreamSettings(ema_alpha=0.5)
    static = training_settings(settings, fold_in_training=False)
    assert static.ema_alpha == 1.0 and training_settings(settings, True) is settings
    a = self_forcing_rollout(model, text, noise, ren, settings, 3, with_grad=False)
    b = self_forcing_rollout(model, text, noise, ren, static, 3, with_grad=False)
    # chunks 0-2 never see a folded sink (the first fold happens when chunk 2 is committed)
    assert torch.allclose(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)


def test_exit_step_is_uniform_and_checked(setup):
    g = torch.Generator().manual_seed(0)
    draws = [sample_exit_step(4, g) for _ in range(400)]
    assert set(draws) == {0, 1, 2, 3} and all(60 < draws.count(i) < 140 for i in range(4))
    model, text, noise, ren = setup
    with pytest.raises(InputError, match="exit_step"):
        self_forcing_rollout(model, text, noise, ren, StreamSettings(), 4)
