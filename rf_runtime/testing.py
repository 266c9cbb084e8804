"""Tiny random components for tests and smoke runs (the idea of diffusers' get_dummy_components).

``write_model_dir(path)`` writes a complete model directory with random weights in seconds, so the
whole pipeline (Streamer, rf-generate) can run on a fresh machine without downloaded weights. Its
videos are structured noise: it proves the plumbing, not the model.
"""

import sys

from rf_runtime.errors import missing_extra

try:
    import torch

    from rf_runtime.models import CausalDiT, DiTConfig
except ImportError as _exc:  # no torch: one line naming the extra (as a command: no traceback either)
    _err = missing_extra(_exc)
    if _err is None:
        raise
    if __name__ == "__main__":
        print(f"python -m rf_runtime.testing: error: {_err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise _err from None
from rf_runtime.text.hashed import HashedTextEncoder

TEXT = HashedTextEncoder(text_dim=16, text_len=8, seed=3)
DIT = DiTConfig(dim=32, ffn_dim=48, freq_dim=16, text_dim=TEXT.text_dim, text_len=TEXT.text_len,
                num_heads=2, num_layers=2)
VAE = dict(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
           temperal_downsample=(False, True, True))
HEIGHT, WIDTH = 32, 48  # latent 4 x 6: non-square, 2 x 3 patches


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = CausalDiT(DIT)
    with torch.no_grad():  # larger weights than the default init so the cache visibly matters
        for name, p in model.named_parameters():
            if not name.endswith("norm_q.weight") and not name.endswith("norm_k.weight"):
                p.normal_(0, 0.15)
    return model.eval()


def tiny_vae(seed=0):
    from rf_runtime.models import VAEConfig, WanVAE

    torch.manual_seed(seed)
    return WanVAE(VAEConfig(**VAE)).eval()


def write_model_dir(path, seed=0, stream=None):
    """A complete model folder (``rf_runtime.model_dir``, what ``Streamer.load`` reads) with random weights.
    ``stream``: stream settings that differ from the defaults."""
    from rf_runtime import model_dir

    dit, vae = tiny_dit(seed), tiny_vae(seed)
    model_dir.write(path, dit, vae, text_encoder=TEXT.to_dict(), stream=stream, resolution=(HEIGHT, WIDTH),
                    model_card={"name": "tiny-random", "training_stage": "random"})
    return dit, vae


def main(argv=None):
    """``python -m rf_runtime.testing DIR``: write a tiny random model directory to DIR."""
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m rf_runtime.testing OUTPUT_DIR   (writes a tiny random model directory there)"
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) != 1 or args[0].startswith("-"):  # never a model directory named '--help'
        print(usage, file=sys.stderr)
        return 2
    write_model_dir(args[0])
    print(f"wrote a tiny random model to {args[0]} (random weights: the video will be noise)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
