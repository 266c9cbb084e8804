"""Where a prompt's colour, background and shape are lost: the same checks at every stage of the pipeline.

``stage_scores`` scores, on the same prompts and with ``rf_runtime.world.follow``'s checks:

- ``world``: the world's own renders (the ground truth; 100 % by construction, a check of the checks);
- ``vae``: those renders encoded and decoded by the VAE (what the latent space can keep at all), with
  the reconstruction's PSNR;
- ``teacher``: the bidirectional teacher's own samples (Euler with CFG over one training clip of
  latent frames), i.e. what DMD distils;
- ``stream``: the causal model streamed chunk by chunk through a ``Streamer`` (what users get).

A stage whose checks fall well below the previous stage's is where the prompt is lost. Motion needs
long videos, so it is only meaningful for ``world``, ``vae`` and ``stream`` at several seconds; the
teacher's clip is one training clip (21 latent frames = 1.3 s at 16 fps).
"""

from __future__ import annotations

import numpy as np

from rf_runtime.world import follow, procedural
from rf_runtime.world.heldout import scene_of


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos, in dB (255 peak)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _vae_roundtrip(vae, scene, frames: int) -> np.ndarray:
    """The scene's first ``frames`` frames through the VAE: rendered to 1 + stride k frames (what the
    encoder takes), encoded, decoded, cut back."""
    import torch

    from rf_runtime.backends.base import to_uint8_frames
    from rf_runtime.world.training import to_pixels

    step = getattr(getattr(vae, "config", None), "stride", (1,))[0]
    video = procedural.render(scene, 1 + step * -(-(frames - 1) // step))
    with torch.no_grad():
        z = vae.encode(to_pixels(video[None]))
        pixels = vae.decode(z).numpy()[0]
    return to_uint8_frames(pixels)[:frames]


def _teacher_sample(dit, vae, cfg, prompt: str, guidance: float, seed: int) -> np.ndarray:
    import torch

    from rf_runtime.backends.base import to_uint8_frames
    from rf_runtime.world.training import sample_teacher

    text = torch.from_numpy(cfg.text.encode([prompt]))
    h, w = cfg.latent_hw
    z = sample_teacher(
        dit,
        text,
        (cfg.latent_frames, cfg.vae.z_dim, h, w),
        guidance=guidance,
        shift=cfg.stream.shift,
        seed=seed,
    )
    with torch.no_grad():
        pixels = vae.decode(z.transpose(1, 2)).numpy()[0]
    return to_uint8_frames(pixels)


def _stream(streamer, prompt: str, frames: int, seed: int) -> np.ndarray:
    return np.concatenate(list(streamer.stream(prompt, seed=seed, num_frames=frames)))


def stage_scores(
    prompts,
    *,
    vae=None,
    teacher=None,
    streamer=None,
    seconds: float = 4.0,
    guidance: float = 3.0,
    seed: int = 0,
    cfg=None,
) -> dict:
    """{stage: {"summary": follow.summarize(...), "prompts": {prompt: checks}}} for the stages whose
    model is given (``world`` always; ``vae`` with a WanVAE; ``teacher`` with a teacher DiT and the VAE;
    ``stream`` with a Streamer). The ``vae`` stage adds "psnr" per prompt and its mean."""
    from rf_runtime.world.training import WorldConfig

    cfg = cfg or WorldConfig()
    frames = max(2, int(round(seconds * procedural.FPS)))
    out: dict = {}

    def add(stage: str, prompt: str, video: np.ndarray, **extra) -> None:
        checks = follow.eval_hook(video, prompt, procedural.FPS)
        out.setdefault(stage, {"prompts": {}})["prompts"][prompt] = {**checks, **extra}

    for i, prompt in enumerate(prompts):
        scene = scene_of(prompt)
        truth = procedural.render(scene, frames)
        add("world", prompt, truth)
        if vae is not None:
            recon = _vae_roundtrip(vae, scene, frames)
            add("vae", prompt, recon, psnr=psnr(recon, truth))
            if teacher is not None:
                add("teacher", prompt, _teacher_sample(teacher, vae, cfg, prompt, guidance, seed + i))
        if streamer is not None:
            add("stream", prompt, _stream(streamer, prompt, frames, seed + i))
    for stage, rows in out.items():
        rows["summary"] = follow.summarize(rows["prompts"])
        if stage == "vae":
            rows["summary"]["psnr"] = float(np.mean([r["psnr"] for r in rows["prompts"].values()]))
    return out


CHECKS = {
    "colour": "colour",
    "background": "backgr.",
    "background_gray_white": "gray/white",
    "shape": "shape",
    "one_object": "one obj.",
    "motion_ok": "motion",
}


def stage_table(scores: dict) -> str:
    """One row per stage: the checks' shares in percent (motion: of prompts), PSNR for the VAE."""
    head = f"{'stage':<9}" + "".join(f"{name:>11}" for name in CHECKS.values()) + f"{'PSNR dB':>9}"
    lines = [head]
    for stage, rows in scores.items():
        s = rows["summary"]
        cells = "".join(f"{100 * s[k]:>10.1f}%" for k in CHECKS)
        lines.append(f"{stage:<9}{cells}{s['psnr']:>9.1f}" if "psnr" in s else f"{stage:<9}{cells}{'':>9}")
    return "\n".join(lines)
