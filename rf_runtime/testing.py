"""Tiny random components for tests and smoke runs (the idea of diffusers' get_dummy_components).

``write_model_dir(path)`` writes a complete model directory with random weights in seconds, so the
whole pipeline (Streamer, rf-generate) can run on a fresh machine without downloaded weights. Its
videos are structured noise: it proves the plumbing, not the model.
"""

import json
import os
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
DIT = DiTConfig(
    dim=32, ffn_dim=48, freq_dim=16, text_dim=TEXT.text_dim, text_len=TEXT.text_len, num_heads=2, num_layers=2
)
VAE = dict(
    dim=8,
    z_dim=16,
    dim_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    attn_scales=(),
    temperal_downsample=(False, True, True),
)
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
    model_dir.write(
        path,
        dit,
        vae,
        text_encoder=TEXT.to_dict(),
        stream=stream,
        resolution=(HEIGHT, WIDTH),
        model_card={"name": "tiny-random", "training_stage": "random"},
    )
    return dit, vae


WAN_HW = (480, 832)  # the release's resolution
WAN_CHECKPOINT = "generator.pt"


def write_wan_random_dir(
    path, *, device="cpu", dtype=torch.bfloat16, seed=0, dit_config=None, vae_config=None, resolution=WAN_HW
):
    """A model directory at the real Wan2.1-T2V-1.3B geometry (DiTConfig / VAEConfig defaults: 30 layers,
    dim 1536, the full Wan VAE) with random weights (the modules' default init), for speed measurements:
    speed does not depend on weight values. The text encoder is the hashed one at umT5's output size
    (4096 x 512), so no 5.7B-parameter umT5 is needed. ``device``: where the weights are initialised.
    Weights are written with ``torch.save`` (``generator.pt``: pass it as the checkpoint; ``vae.pth``), so
    nothing beyond torch and numpy is needed to read them. dit_config / vae_config / resolution: other
    sizes (tests write the same layout small)."""
    from rf_runtime.models import VAEConfig, WanVAE

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    dit_cfg = dit_config or DiTConfig()
    text = HashedTextEncoder(text_dim=dit_cfg.text_dim, text_len=dit_cfg.text_len, seed=seed)
    torch.manual_seed(seed)
    with torch.device(device):
        dit, vae = CausalDiT(dit_cfg), WanVAE(vae_config or VAEConfig())
    for model, name in ((dit, WAN_CHECKPOINT), (vae, "vae.pth")):
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(path, name))
        del state
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(dit_cfg.to_dict(), _class_name="WanModel"), f)
    vae_card = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(vae.config).items()}
    card = {
        "vae": vae_card,
        "resolution": list(resolution),
        "text_encoder": text.to_dict(),
        "model_card": {"name": "wan2.1-1.3b-random", "training_stage": "random"},
    }
    with open(os.path.join(path, "rf_runtime.json"), "w") as f:
        json.dump(card, f)
    return path


def main(argv=None):
    """``python -m rf_runtime.testing [--preset tiny|wan2.1-1.3b] [--device D] OUTPUT_DIR``: write a random
    model directory (tiny: seconds, for tests; wan2.1-1.3b: the real geometry at 480x832, for speed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m rf_runtime.testing [--preset tiny|wan2.1-1.3b] [--device cpu|cuda] OUTPUT_DIR   "
        "(writes a random model directory there: tiny by default; wan2.1-1.3b is the real 1.3B geometry)"
    )
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    options = {"--preset": "tiny", "--device": "cpu"}
    while len(args) > 1 and args[0] in options:
        key = args.pop(0)  # not `options[args.pop(0)] = args.pop(0)`: Python evaluates the value first
        options[key] = args.pop(0)
    if len(args) != 1 or args[0].startswith("-") or options["--preset"] not in ("tiny", "wan2.1-1.3b"):
        print(usage, file=sys.stderr)  # never a model directory named '--help'
        return 2
    if options["--preset"] == "tiny":
        write_model_dir(args[0])
    else:
        write_wan_random_dir(args[0], device=options["--device"])
    print(
        f"wrote a {options['--preset']} random model to {args[0]} (random weights: the video will be noise)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
