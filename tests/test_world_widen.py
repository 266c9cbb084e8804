"""The widened world DiT computes what the original does (Net2Net's wider operator), at twice the size."""

import pytest
import torch

from rf_runtime.errors import ConfigError
from rf_runtime.models import CausalDiT
from rf_runtime.world import training as T
from rf_runtime.world.widen import widen_dit, widened_config


def _trained_like(cfg, seed=0):
    """A DiT whose weights are all non-trivial (Wan zero-initialises some; a zero weight would hide a
    wrong rule)."""
    torch.manual_seed(seed)
    model = CausalDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_widened_model_is_the_same_function(noise):
    cfg = T.TINY.dit
    model = _trained_like(cfg)
    wide = widen_dit(model, noise=noise).eval()
    assert wide.config == widened_config(cfg)
    assert (wide.config.dim, wide.config.ffn_dim, wide.config.num_heads) == (
        2 * cfg.dim,
        2 * cfg.ffn_dim,
        2 * cfg.num_heads,
    )
    assert wide.config.head_dim == cfg.head_dim  # the RoPE is unchanged
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in wide.parameters()) > 3 * n
    torch.manual_seed(1)
    x = torch.randn(2, 6, cfg.in_dim, 4, 4)
    t = torch.rand(2, 6) * 1000
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        ref, got = model.forward_full(x, t, text), wide.forward_full(x, t, text)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-5, rel  # fp32 rounding: the sums run over twice as many terms


def test_copies_get_different_weights_so_training_separates_them():
    model = _trained_like(T.TINY.dit)
    w = widen_dit(model, noise=0.05).state_dict()["blocks.0.ffn.2.weight"]
    half = w.shape[1] // 2
    assert not torch.allclose(w[:, :half], w[:, half:])
    old = model.state_dict()["blocks.0.ffn.2.weight"]  # [dim, ffn]: its rows are written twice
    for rows in (w[: old.shape[0]], w[old.shape[0] :]):
        torch.testing.assert_close(rows[:, :half] + rows[:, half:], old)


def test_the_real_world_config_widens():
    cfg = T.WorldConfig().dit
    wide = widened_config(cfg)
    assert (wide.dim, wide.ffn_dim, wide.num_heads, wide.num_layers) == (192, 768, 8, 4)
    CausalDiT(wide)  # a valid config


def test_negative_noise_is_refused():
    with pytest.raises(ConfigError, match="noise"):
        widen_dit(CausalDiT(T.TINY.dit), noise=-1)


def test_rechannel_keeps_every_weight_but_the_latent_input_and_output():
    from rf_runtime.world.widen import rechannel_dit

    old = _trained_like(T.TINY.dit)
    new = rechannel_dit(old, 6)
    assert (new.config.in_dim, new.config.out_dim) == (6, 6)
    before, after = old.state_dict(), new.state_dict()
    fresh = {k for k in after if k.startswith(("patch_embedding.", "head.head."))}
    # the fresh layers are exactly the ones whose shape names the channels: embedding and projection
    assert fresh == {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias"}
    assert after["patch_embedding.weight"].shape[1] == 6
    patch = 1
    for p in T.TINY.dit.patch_size:
        patch *= p
    assert after["head.head.weight"].shape[0] == patch * 6
    for k in after.keys() - fresh:
        assert torch.equal(after[k], before[k]), k
    # it runs on latents of the new width and returns that width
    f, (h, w) = 3, T.TINY.latent_hw
    x = torch.randn(1, f, 6, h, w)
    text = torch.randn(1, T.TINY.dit.text_len, T.TINY.dit.text_dim)
    out = new.forward_full(x, torch.full((1, f), 500.0), text)
    assert out.shape == x.shape


def test_rechannel_to_no_channels_is_refused():
    from rf_runtime.world.widen import rechannel_dit

    with pytest.raises(ConfigError, match="z_dim must be >= 1"):
        rechannel_dit(_trained_like(T.TINY.dit), 0)
