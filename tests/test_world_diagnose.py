"""rf-world diagnose: the prompt-following checks stage by stage find the stage that loses the prompt."""

import json

import numpy as np
import pytest
import torch

from rf_runtime.world import diagnose

pytest.importorskip("cv2")

PROMPTS = ["a red square moving left quickly on a gray background", "a green triangle moving right"]


class IdentityVAE:
    """A perfect autoencoder (latents are the pixels): its stage must score exactly as the world does."""

    def encode(self, pixels):
        return pixels.clone()

    def decode(self, z):
        return z.clamp(-1, 1)


class SwapRedGreenVAE(IdentityVAE):
    """Reconstructs every pixel but swaps the red and green channels: colour (only) is lost here."""

    def decode(self, z):
        return z[:, [1, 0, 2]].clamp(-1, 1)


def test_psnr_by_hand():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 10  # one error of 10 in 96 values: mse = 100 / 96
    assert diagnose.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (100 / 96)), rel=1e-12)
    assert diagnose.psnr(a, a) == float("inf")


def test_a_perfect_vae_scores_as_the_world_and_a_colour_swap_loses_only_colour():
    perfect = diagnose.stage_scores(PROMPTS, vae=IdentityVAE(), seconds=3)
    assert set(perfect) == {"world", "vae"}
    for stage in perfect.values():  # the world's own renders pass every check, and so do exact copies
        s = stage["summary"]
        assert (s["colour"], s["background"], s["shape"], s["one_object"], s["motion_ok"]) == (1, 1, 1, 1, 1)
    assert perfect["vae"]["summary"]["psnr"] == float("inf")

    swapped = diagnose.stage_scores(PROMPTS, vae=SwapRedGreenVAE(), seconds=3)["vae"]
    rows = swapped["prompts"]
    # red <-> green: both objects are drawn in the other's colour, every frame; the gray backdrop
    # (equal channels) and the shapes and motion are untouched
    assert [rows[p]["colour"] for p in PROMPTS] == [0.0, 0.0]
    assert all(rows[p]["background"] == 1.0 and rows[p]["shape"] == 1.0 for p in PROMPTS)
    assert all(rows[p]["motion_ok"] for p in PROMPTS)
    assert np.isfinite(swapped["summary"]["psnr"]) and swapped["summary"]["psnr"] < 20
    table = diagnose.stage_table({"world": perfect["world"], "vae": swapped})
    assert table.splitlines()[2].split()[:2] == ["vae", "0.0%"]


def test_cli_writes_every_stage_of_a_tiny_pipeline(tmp_path):
    """A tiny random VAE and teacher through the command: every stage scored, the JSON complete."""
    from rf_runtime.world import cli, training as T

    cfg = T.TINY
    torch.manual_seed(0)
    vae = T.save_vae(T.WanVAE(cfg.vae), str(tmp_path / "vae.safetensors"))
    dit = T.save_dit(T.CausalDiT(cfg.dit), str(tmp_path / "dit.safetensors"))
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[1] + "\n")
    out = tmp_path / "d.json"
    assert (
        cli.main(
            [
                "diagnose",
                "--vae",
                vae,
                "--teacher",
                dit,
                "--prompts-file",
                str(prompts),
                "--seconds",
                "1",
                "--tiny",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert set(got) == {"world", "vae", "teacher"}
    assert got["world"]["summary"]["colour"] == 1.0
