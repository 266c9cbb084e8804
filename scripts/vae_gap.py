"""Is a VAE's colour lost in its encoder or in its decoder? (docs/notes/world.md, seventh session)

    python scripts/vae_gap.py --vae V.safetensors [--steps 150] [--prompt P ...]

For each prompt it renders the world's clip (9 frames), and compares two reconstructions through the
same decoder: from the encoder's latents, and from latents fitted to the clip by gradient descent
through the frozen decoder (Adam, ``--steps``, started at the encoder's latents). If the fitted
latents reconstruct the clip much better, the decoder can draw it and the encoder does not find the
code (an amortisation gap): training the decoder alone cannot help, the encoder must change.
It prints PSNR and the mean colour of the object's pixels (true / encoder / fitted) per prompt.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rf_runtime.backends.base import to_uint8_frames
from rf_runtime.world import procedural
from rf_runtime.world import training as T
from rf_runtime.world.diagnose import psnr
from rf_runtime.world.heldout import scene_of

PROMPTS = (
    "a blue circle moving up on a gray background",
    "a big blue triangle moving left on a white background",
    "a small white circle moving left slowly on a gray background",
    "a big purple circle moving down slowly",
)


def _object_colour(video: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean colour of ``video`` over the pixels where ``truth`` differs from its background."""
    mask = np.abs(truth.astype(int) - truth[:, :1, :1].astype(int)).max(-1) > 30
    return video[mask].mean(0).round().astype(int)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument(
        "--prompt", action="append", help="prompt of the world (repeatable; default: four held-out ones)"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    vae = T.load_vae(args.vae).eval()
    for param in vae.parameters():
        param.requires_grad_(False)
    for prompt in args.prompt or PROMPTS:
        truth = procedural.render(scene_of(prompt), 9)
        x = T.to_pixels(truth[None])
        with torch.no_grad():
            z_enc = vae.encode(x)
            from_encoder = to_uint8_frames(vae.decode(z_enc).numpy()[0])
        z = z_enc.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(args.steps):
            loss = ((T.decode_train(vae, z) - x) ** 2).mean()  # differentiable decode
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            fitted = to_uint8_frames(vae.decode(z).numpy()[0])
        print(
            f"{prompt}: PSNR encoder {psnr(from_encoder, truth):.1f} dB, fitted {psnr(fitted, truth):.1f} dB; "
            f"object colour true {_object_colour(truth, truth).tolist()} encoder "
            f"{_object_colour(from_encoder, truth).tolist()} fitted {_object_colour(fitted, truth).tolist()}"
        )


if __name__ == "__main__":
    main()
