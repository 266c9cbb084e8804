"""Checkpoint loading by key name and shape: release layouts, prefixes and clear mismatch errors."""

import json

import pytest
import torch

from rf_runtime.errors import CheckpointError, ConfigError
from rf_runtime.models import CausalDiT, DiTConfig
from rf_runtime.models.dit import normalize_state_dict

TINY = DiTConfig(dim=32, ffn_dim=48, freq_dim=16, text_dim=8, text_len=8, num_heads=2, num_layers=2)


def test_release_1p3b_state_dict_loads_on_meta():
    """A state dict shaped like Wan2.1-T2V-1.3B / rewardforcing.pt (keys wrapped with ``model.``)."""
    cfg = DiTConfig()
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.text_dim, cfg.text_len) == (
        1536,
        8960,
        12,
        30,
        4096,
        512,
    )
    with torch.device("meta"):
        ref = CausalDiT(cfg)
    sd = {"model." + k: v for k, v in ref.state_dict().items()}
    assert "model.blocks.29.cross_attn.norm_k.weight" in sd and "model.head.modulation" in sd
    assert "model.time_projection.1.weight" in sd and "model.text_embedding.2.bias" in sd
    model = CausalDiT.from_state_dict(sd, cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1.40e9 < n < 1.43e9  # SPEC: ~1.419 B parameters
    assert model.blocks[0].self_attn.q.weight.shape == (1536, 1536)


def tiny_state():
    torch.manual_seed(0)
    return CausalDiT(TINY).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model." + k: v for k, v in sd.items()},
        lambda sd: {
            "generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in sd.items()},
            "generator": {},
        },
        lambda sd: {"generator_ema." + k: v for k, v in sd.items()},
    ],
)
def test_prefixes_are_stripped(wrap):
    sd = tiny_state()
    model = CausalDiT.from_state_dict(wrap(sd), TINY)
    assert torch.equal(model.blocks[1].ffn[2].weight, sd["blocks.1.ffn.2.weight"])


def test_use_ema_picks_the_nested_generator():
    ema, raw = tiny_state(), {k: v + 1 for k, v in tiny_state().items()}
    both = {"generator": raw, "generator_ema": ema}
    assert torch.equal(CausalDiT.from_state_dict(both, TINY).head.modulation, ema["head.modulation"])
    assert torch.equal(
        CausalDiT.from_state_dict(both, TINY, use_ema=False).head.modulation, raw["head.modulation"]
    )
    assert set(normalize_state_dict(both)) == set(ema)


def test_wrong_keys_and_shapes_are_listed():
    sd = tiny_state()
    sd.pop("blocks.0.self_attn.q.weight")
    sd["blocks.0.extra"] = torch.zeros(1)
    sd["head.head.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        CausalDiT.from_state_dict(sd, TINY)
    msg = str(err.value)
    assert "missing keys (1): blocks.0.self_attn.q.weight" in msg
    assert "unexpected keys (1): blocks.0.extra" in msg
    assert "head.head.bias" in msg and "(3,)" in msg


def test_from_pretrained_directory(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_state()
    cfg = dict(TINY.to_dict(), _class_name="WanModel", _diffusers_version="0.30.0")  # extra keys are ignored
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = CausalDiT.from_pretrained(tmp_path)
    assert model.config == TINY
    # a generator checkpoint on top: a flat model.* dict in a .pt file (the rewardforcing.pt layout)
    other = {"model." + k: v * 2 for k, v in sd.items()}
    torch.save(other, tmp_path / "rewardforcing.pt")
    tuned = CausalDiT.from_pretrained(tmp_path, tmp_path / "rewardforcing.pt")
    assert torch.equal(tuned.head.head.weight, sd["head.head.weight"] * 2)
    with pytest.raises(CheckpointError, match="config.json"):
        CausalDiT.from_pretrained(tmp_path / "nope")


def test_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        DiTConfig(dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="patch_size"):
        DiTConfig(patch_size=(2, 2, 2))
