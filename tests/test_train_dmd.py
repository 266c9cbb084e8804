"""Re-DMD losses (SPEC section 6) against hand-worked formulas and autograd."""

import math

import pytest
import torch

from rf_runtime.errors import ConfigError
from rf_runtime.train.dmd import (
    DMDSettings,
    add_noise,
    critic_loss,
    dmd_gradient,
    generator_loss,
    reward_weights,
    sample_timesteps,
    shift_timestep,
    sigma_of,
)

SHAPE = (3, 6, 4, 2, 2)  # B, F, C, H, W


def test_shifted_clamped_timesteps():
    # shift 5: t = 500 -> 1000 * 2.5 / 3 = 833.33; t = 0 -> 0; t = 999 -> 999.8
    t = shift_timestep(torch.tensor([0.0, 500.0, 999.0]), 5.0)
    assert torch.allclose(t, torch.tensor([0.0, 2500 / 3, 1000 * 5 * 0.999 / (1 + 4 * 0.999)]))
    draws = sample_timesteps(4000, DMDSettings(), torch.Generator().manual_seed(0))
    assert draws.min() == 20.0 and draws.max() == 980.0  # both clamps are hit
    # shift 5 pushes mass to high noise: P(t' <= 500) = P(u <= 1/6) ~ 0.167 (before clamping)
    assert abs((draws <= 500).float().mean().item() - 1 / 6) < 0.03


def test_sigma_lookup_is_the_shifted_table():
    # the table maps t = 1000 s' exactly, so the nearest entry of t has sigma ~ t / 1000
    t = torch.tensor([20.0, 300.0, 833.3, 980.0])
    assert torch.allclose(sigma_of(t, DMDSettings()), t / 1000, atol=2e-3)


def test_dmd_gradient_closed_form():
    """Constant flows: teacher cond c, uncond u, critic f. Then x0 predictions are x_t - s * flow and
    grad = s (c + 3 (c - u) - f) / mean|x0 - real| (hand-worked)."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([100.0, 500.0, 900.0])
    sigma = torch.tensor([0.1, 0.5, 0.9])
    c, u, f = 0.3, -0.2, 0.7
    cond, uncond = torch.ones(3, 2, 8), torch.zeros(3, 2, 8)

    def teacher(x_t, tf, text):  # one batched call: conditional samples first, then unconditional
        assert (
            x_t.shape[0] == 6 and torch.equal(tf[:3, 0], t) and torch.equal(tf[3:, -1], t)
        )  # one t for all frames
        flow = torch.where(text.sum(dim=(1, 2)) > 0, c, u)
        return flow.view(-1, 1, 1, 1, 1).expand_as(x_t)

    def critic(x_t, tf, text):
        assert text.sum() > 0  # conditional only
        return torch.full_like(x_t, f)

    grad, logs = dmd_gradient(x0, t, sigma, eps, teacher, critic, cond, uncond, guidance_scale=3.0)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    real = x_t - s * c - 3.0 * s * (c - u)
    expected = s * (c + 3 * (c - u) - f) / (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(grad, expected.expand(SHAPE), rtol=1e-5, atol=1e-6)
    assert torch.isclose(logs["dmd_grad_abs_mean"], expected.abs().expand(SHAPE).mean())


def test_dmd_gradient_zeroes_nans():
    # x0 = real and fake = real: 0 / 0 -> NaN -> 0
    x0 = torch.zeros(SHAPE)
    zero_flow = lambda x_t, tf, text: x_t / 0.5  # x0 prediction = x_t - 0.5 * x_t / 0.5 = 0
    grad, _ = dmd_gradient(
        x0,
        torch.full((3,), 500.0),
        torch.full((3,), 0.5),
        torch.randn(SHAPE),
        zero_flow,
        zero_flow,
        torch.ones(3, 2, 8),
        torch.zeros(3, 2, 8),
        3.0,
    )
    assert torch.equal(grad, torch.zeros(SHAPE))


def test_weighted_generator_gradient_is_w_times_dmd_gradient():
    """d L / d x0_b = w_b * grad_b / (B N) (autograd), and the parameter gradient is the w-weighted
    sum of each sample's DMD parameter gradient."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(SHAPE[1:], generator=g, requires_grad=True)
    base = torch.randn(SHAPE, generator=g)
    grad = torch.randn(SHAPE, generator=g)
    reward = torch.tensor([0.5, -1.0, 2.0])
    w, _ = reward_weights(reward, beta=0.5, normalize=False)
    assert torch.allclose(w, torch.exp(2 * reward))  # the release's exp(2 r)

    x0 = theta * base
    x0.retain_grad()
    loss, _ = generator_loss(x0, grad, w)
    loss.backward()
    n = math.prod(SHAPE[1:])
    assert torch.allclose(x0.grad, w.view(-1, 1, 1, 1, 1) * grad / (3 * n), rtol=1e-6)
    # per-sample unweighted DMD gradients of theta, combined with w
    expected = torch.zeros_like(theta)
    for b in range(3):
        theta_b = theta.detach().clone().requires_grad_(True)
        loss_b, _ = generator_loss((theta_b * base[b : b + 1]), grad[b : b + 1])
        loss_b.backward()
        expected += w[b] * theta_b.grad / 3
    assert torch.allclose(theta.grad, expected, rtol=1e-5)


def test_constant_reward_gives_plain_dmd():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g, requires_grad=True)
    grad = torch.randn(SHAPE, generator=g)
    w, logs = reward_weights(torch.full((3,), 1.7), beta=0.5, normalize=True)
    assert torch.equal(w, torch.ones(3)) and logs["reward_std"] == 0
    redmd, _ = generator_loss(x0, grad, w)
    (g_redmd,) = torch.autograd.grad(redmd, x0)
    dmd, _ = generator_loss(x0, grad)
    (g_dmd,) = torch.autograd.grad(dmd, x0)
    assert torch.equal(redmd, dmd) and torch.equal(g_redmd, g_dmd)
    # plain DMD is 0.5 * MSE(x0, x0 - grad) = 0.5 * mean(grad^2)
    assert torch.isclose(dmd, 0.5 * (grad.double() ** 2).mean())


def test_batch_normalised_weights_average_to_one_and_carry_no_gradient():
    r = torch.tensor([0.0, 1.0, -1.0, 3.0], requires_grad=True)
    w, logs = reward_weights(r, beta=2.0, normalize=True)
    assert not w.requires_grad
    e = torch.exp(r.detach() / 2.0)
    assert torch.allclose(w, e / e.mean()) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.isclose(logs["reward_max"], torch.tensor(3.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match="beta"):
        reward_weights(r, beta=0.0, normalize=True)


def test_critic_loss_is_flow_matching():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t, sigma = torch.full((3,), 400.0), torch.tensor([0.2, 0.4, 0.8])
    # a critic that outputs the true flow eps - x0 has zero loss; an offset d gives d^2
    perfect = lambda x_t, tf, text: eps - x0
    assert critic_loss(perfect, x0, t, sigma, eps, None)[0] < 1e-10
    off = lambda x_t, tf, text: eps - x0 + 0.25
    loss, logs = critic_loss(off, x0, t, sigma, eps, None)
    assert torch.isclose(loss, torch.tensor(0.0625), atol=1e-5) and "critic_loss" in logs
    assert torch.allclose(add_noise(x0, eps, sigma)[1], 0.6 * x0[1] + 0.4 * eps[1])
