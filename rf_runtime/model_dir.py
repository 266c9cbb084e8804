"""A model folder: the directory of PyTorch weights that ``Streamer.load``, ``rf-generate
--model-dir``, ``rf-export onnx`` and ``rf-train`` read. Read and written here, and nowhere else.

    config.json                             the DiT config (Wan2.1's field names)
    diffusion_pytorch_model*.safetensors    the DiT weights
    Wan2.1_VAE.pth | vae.safetensors        the VAE weights
    rf_runtime.json                         optional card: VAE config, stream settings, resolution,
                                            text encoder, model card (models made with this project)
    models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/   the umT5 text encoder (Wan2.1 layout), unless
                                            the card names another ("hashed")

``read_card`` and ``is_model_dir`` need no torch; ``load`` and ``write`` import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from rf_runtime.dtypes import FLOAT
from rf_runtime.errors import CheckpointError, ConfigError
from rf_runtime.files import atomic_save, atomic_write_json, json_ready
from rf_runtime.sampler import StreamSettings

CONFIG = "config.json"
CARD = "rf_runtime.json"
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_FILES = ("Wan2.1_VAE.pth", "vae.safetensors", "vae.pth")
CARD_KEYS = ("vae", "stream", "resolution", "text_encoder", "model_card")
DEFAULT_HW = (480, 832)  # the released model's video size
DTYPES = FLOAT  # the precisions the PyTorch models run in


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with a DiT ``config.json``."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG))


def read_card(path: str | os.PathLike) -> dict:
    """The folder's ``rf_runtime.json`` ({} when it has none), with its keys and stream settings checked."""
    card_path = os.path.join(os.fspath(path), CARD)
    if not os.path.isfile(card_path):
        return {}
    with open(card_path) as f:
        card = json.load(f)
    unknown = set(card) - set(CARD_KEYS)
    if unknown:
        raise ConfigError(f"{card_path}: unknown keys {sorted(unknown)}; known keys are {sorted(CARD_KEYS)}")
    StreamSettings.check_names(card.get("stream", {}), card_path)
    return card


def stream_settings(card: dict, **overrides) -> StreamSettings:
    """The stream settings a card gives (defaults for what it leaves out), with ``overrides`` on top."""
    return StreamSettings.from_dict({**card.get("stream", {}), **overrides})


def resolution(card: dict) -> tuple[int, int]:
    """(height, width) of the video the model makes by default."""
    h, w = card.get("resolution", DEFAULT_HW)
    return int(h), int(w)


def find_vae(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    for name in VAE_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(
        f"no VAE weights in {path}: expected Wan2.1_VAE.pth or vae.safetensors (or pass vae_path=...)"
    )


def latent_hw_for(height: int, width: int, spatial_stride: int, patch_hw: tuple[int, int]) -> tuple[int, int]:
    """Latent size for a video size; both must land on whole patches."""
    unit_h, unit_w = spatial_stride * patch_hw[0], spatial_stride * patch_hw[1]
    if height <= 0 or width <= 0 or height % unit_h or width % unit_w:
        raise ConfigError(
            f"height x width = {height}x{width} must be positive multiples of {unit_h}x{unit_w} "
            f"(VAE stride {spatial_stride} x patch {patch_hw}); 480x832 is the released size"
        )
    return height // spatial_stride, width // spatial_stride


def check_text_encoder(dit_config, text_encoder) -> None:
    """The text encoder's embeddings must have the width the DiT was trained on."""
    if getattr(text_encoder, "text_dim", dit_config.text_dim) != dit_config.text_dim:
        raise ConfigError(
            f"the text encoder gives {text_encoder.text_dim}-dim embeddings but the DiT expects "
            f"text_dim={dit_config.text_dim}: pair the DiT with the text encoder it was trained with"
        )


@dataclass
class Models:
    """What a model folder holds, loaded: the DiT, the VAE, the text encoder, and the card's settings."""

    dit: Any  # rf_runtime.models.CausalDiT
    vae: Any  # rf_runtime.models.WanVAE
    text_encoder: Any
    settings: StreamSettings
    resolution: tuple[int, int]
    card: dict


def load(
    path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    vae_path=None,
    text_encoder=None,
    settings: StreamSettings | None = None,
    use_ema: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    **text_options,
) -> Models:
    """Load every model of a folder (PyTorch).

    checkpoint: generator weights on top of the folder's DiT (``rewardforcing.pt`` or an rf-train
        checkpoint; ``use_ema`` picks ``generator_ema`` in the latter).
    text_encoder: an encoder object to use instead of the folder's; ``text_options`` go to the
        umT5 loader (device, dtype).
    settings: stream settings instead of the card's.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"model directory {path} does not exist: pass a Wan2.1-style directory "
            "(config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, text encoder)"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from rf_runtime.dtypes import torch_dtype

    card = read_card(path)
    dit = load_dit(path, checkpoint, use_ema=use_ema)
    vae = load_vae(path, card, vae_path)
    if text_encoder is None:
        text_encoder = load_text_encoder(path, card, **text_options)
    check_text_encoder(dit.config, text_encoder)
    torch_type = torch_dtype(dtype)
    return Models(
        dit.to(device=device, dtype=torch_type),
        vae.to(device=device, dtype=torch_type),
        text_encoder,
        settings if settings is not None else stream_settings(card),
        resolution(card),
        card,
    )


def load_dit(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, use_ema: bool = True):
    """The folder's ``CausalDiT`` (config.json + weights), with a generator checkpoint on top if given."""
    from rf_runtime.models import CausalDiT

    return CausalDiT.from_pretrained(path, checkpoint, use_ema=use_ema)


def load_vae(path: str | os.PathLike, card: dict, vae_path: str | os.PathLike | None = None):
    """The folder's ``WanVAE``, with the VAE config of its card (Wan2.1's without one)."""
    from rf_runtime.models import VAEConfig, WanVAE

    return WanVAE.from_pretrained(
        vae_path or find_vae(path), VAEConfig(**card["vae"]) if "vae" in card else VAEConfig()
    )


def load_text_encoder(path: str | os.PathLike, card: dict, **options):
    """The text encoder the card names (umT5 from the folder without an entry); ``options`` go to umT5."""
    from rf_runtime.text import text_encoder_from_spec

    return text_encoder_from_spec(
        card.get("text_encoder"), os.path.join(os.fspath(path), CARD), model_dir=path, **options
    )


def save_weights(module, path: str | os.PathLike, *, create_folder: bool = False) -> str:
    """A module's state dict as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    return atomic_save(lambda tmp: save_file(state, tmp), path, "the weights", create_folder=create_folder)


def write(
    path: str | os.PathLike,
    dit,
    vae,
    *,
    text_encoder: dict | None = None,
    stream: StreamSettings | dict | None = None,
    resolution: tuple[int, int] | None = None,
    model_card: dict | None = None,
) -> str:
    """Write a model folder that ``load`` (and so ``Streamer.load``, rf-export, rf-train) reads.

    dit, vae: the modules (``CausalDiT``, ``WanVAE``); their configs go to ``config.json`` and the card.
    text_encoder: the card's text encoder entry (e.g. ``HashedTextEncoder.to_dict()``); None: umT5.
    stream: the stream settings (all of them) or a dict of the ones that differ from the defaults.
    Each file is written to a temporary name and renamed; the folder is created if needed.
    """
    path = os.fspath(path)
    z, ins, outs = vae.config.z_dim, dit.config.in_dim, dit.config.out_dim
    if not z == ins == outs:  # checked before anything is written: no half-written folder
        raise ConfigError(
            f"the DiT reads {ins} and writes {outs} latent channels but the VAE's latents have {z}: "
            "pair the DiT with the VAE whose latents it was trained on"
        )
    os.makedirs(path, exist_ok=True)
    atomic_write_json(os.path.join(path, CONFIG), dict(dit.config.to_dict(), _class_name="WanModel"))
    save_weights(dit, os.path.join(path, DIT_WEIGHTS))
    save_weights(vae, os.path.join(path, "vae.safetensors"))
    if isinstance(stream, StreamSettings):
        stream = stream.to_dict()
    card = {"vae": json_ready(dataclasses.asdict(vae.config)), "stream": dict(stream or {})}
    if resolution is not None:
        card["resolution"] = [int(resolution[0]), int(resolution[1])]
    if text_encoder is not None:
        card["text_encoder"] = dict(text_encoder)
    card["model_card"] = dict(model_card or {})
    StreamSettings.check_names(card["stream"], os.path.join(path, CARD))
    atomic_write_json(os.path.join(path, CARD), card)
    return path
