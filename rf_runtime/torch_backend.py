"""The PyTorch backend: the reference models run in place, buffers are torch tensors on ``device``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from rf_runtime.backend import Backend, ModelInfo, StateArrays, StreamState, to_uint8_frames
from rf_runtime.errors import CheckpointError, ConfigError, require
from rf_runtime.sampler import ChunkRollout, StreamSettings

torch = require("torch", "torch")

MODEL_CARD = "rf_runtime.json"
DEFAULT_HW = (480, 832)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _TorchStream:
    rollout: ChunkRollout
    decoder: object  # VAEStreamDecoder
    latents: object  # [K, 1, f, C, H, W] ring of the last K chunks' clean latents (for a prompt switch)


def latent_hw_for(height: int, width: int, spatial_stride: int, patch_hw: tuple[int, int]) -> tuple[int, int]:
    """Latent size for a video size; both must land on whole patches."""
    unit_h, unit_w = spatial_stride * patch_hw[0], spatial_stride * patch_hw[1]
    if height <= 0 or width <= 0 or height % unit_h or width % unit_w:
        raise ConfigError(f"height x width = {height}x{width} must be positive multiples of {unit_h}x{unit_w} "
                          f"(VAE stride {spatial_stride} x patch {patch_hw}); 480x832 is the released size")
    return height // spatial_stride, width // spatial_stride


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, dit, vae, text_encoder, settings: StreamSettings | None = None,
                 height: int = DEFAULT_HW[0], width: int = DEFAULT_HW[1]):
        self.dit, self.vae, self.text_encoder = dit.eval(), vae.eval(), text_encoder
        settings = settings or StreamSettings()
        cfg = dit.config
        if getattr(text_encoder, "text_dim", cfg.text_dim) != cfg.text_dim:
            raise ConfigError(f"the text encoder gives {text_encoder.text_dim}-dim embeddings but the DiT expects "
                              f"text_dim={cfg.text_dim}: pair the DiT with the text encoder it was trained with")
        stride = vae.config.stride
        latent_hw = latent_hw_for(height, width, stride[1], cfg.patch_size[1:])
        self.info = ModelInfo(latent_channels=cfg.in_dim, latent_hw=latent_hw, vae_stride=stride, settings=settings)
        self.device = dit.patch_embedding.weight.device
        self.dtype = dit.patch_embedding.weight.dtype
        self._vae_cache_shapes = None  # found on first use by decoding one frame

    @classmethod
    def from_dir(cls, model_dir, checkpoint=None, *, vae_path=None, text_encoder=None, settings=None,
                 height=None, width=None, device="cpu", dtype="float32", use_ema=True) -> "TorchBackend":
        from rf_runtime.models import CausalDiT, VAEConfig, WanVAE

        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise CheckpointError(f"model directory {model_dir} does not exist: pass a Wan2.1-style directory "
                                  "(config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, text encoder)")
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        card = read_model_card(model_dir)
        dit = CausalDiT.from_pretrained(model_dir, checkpoint, use_ema=use_ema)
        vae_cfg = VAEConfig(**card["vae"]) if "vae" in card else VAEConfig()
        vae = WanVAE.from_pretrained(vae_path or find_vae(model_dir), vae_cfg)
        if text_encoder is None:
            text_encoder = text_encoder_from_card(card, model_dir)
        if settings is None:
            settings = StreamSettings(**card.get("stream", {}))
        hw = card.get("resolution", DEFAULT_HW)
        dit = dit.to(device=device, dtype=_DTYPES[dtype])
        vae = vae.to(device=device, dtype=_DTYPES[dtype])
        return cls(dit, vae, text_encoder, settings, hw[0] if height is None else height,  # 0 is refused, not the default
                   hw[1] if width is None else width)

    # ---- Backend ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str):
        with torch.no_grad():
            embeds = torch.as_tensor(self.text_encoder.encode([prompt]))
            return self.dit.text_kv(embeds.to(device=self.device, dtype=self.dtype))

    def new_stream(self, text) -> StreamState:
        rollout = ChunkRollout(self.dit, text, 1, self.info.latent_hw, self.info.settings)
        latents = torch.zeros((self.info.context_chunks, *self.info.chunk_latent_shape), device=self.device,
                              dtype=self.dtype)
        return StreamState(_TorchStream(rollout, self.vae.stream_decoder(batch_size=1), latents))

    def upload(self, array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=self.dtype)

    def denoise_step(self, state: StreamState, x, step: int, eps):
        with torch.no_grad():
            return state.device.rollout.denoise_step(x, step, eps)

    def cache_pass(self, state: StreamState, x0) -> None:
        with torch.no_grad():
            state.device.rollout.cache_pass(x0)
        state.chunks_committed = state.device.rollout.chunks_committed

    def decode(self, state: StreamState, x0) -> np.ndarray:
        with torch.no_grad():
            pixels = state.device.decoder.decode_chunk(x0.transpose(1, 2))  # [1, 3, T, H, W]
        return to_uint8_frames(pixels[0].float().cpu().numpy())

    # ---- prompt switch, snapshots, timing --------------------------------------------------

    def set_text(self, state: StreamState, text) -> None:
        state.device.rollout.text_k, state.device.rollout.text_v = text

    def store_latents(self, state: StreamState, slot: int, x0) -> None:
        state.device.latents[slot].copy_(x0)

    def stored_latents(self, state: StreamState, slot: int):
        return state.device.latents[slot]

    def set_cache_fill(self, state: StreamState, chunks_committed: int) -> None:
        state.device.rollout.chunks_committed = chunks_committed
        state.chunks_committed = chunks_committed

    def export_state(self, state: StreamState) -> StateArrays:
        dev = state.device

        def host(t):
            return t.detach().float().cpu().numpy().copy()

        return StateArrays(cache_k=host(dev.rollout.cache_k), cache_v=host(dev.rollout.cache_v),
                           text_k=host(dev.rollout.text_k), text_v=host(dev.rollout.text_v),
                           latents=host(dev.latents), vae_cache=tuple(host(s) for s in dev.decoder.slots),
                           chunks_committed=dev.rollout.chunks_committed)

    def import_state(self, arrays: StateArrays, latent_frames_decoded: int) -> StreamState:
        def device(a):  # a copy: the stream must not write into the caller's arrays
            return self.upload(a).clone()

        state = self.new_stream((device(arrays.text_k), device(arrays.text_v)))
        dev = state.device
        dev.rollout.cache_k.copy_(device(arrays.cache_k))
        dev.rollout.cache_v.copy_(device(arrays.cache_v))
        dev.latents.copy_(device(arrays.latents))
        dev.decoder.slots = [device(s) for s in arrays.vae_cache]
        dev.decoder.frames_decoded = latent_frames_decoded
        self.set_cache_fill(state, arrays.chunks_committed)
        return state

    def state_shapes(self) -> dict:
        cfg, info = self.dit.config, self.info
        if self._vae_cache_shapes is None:
            slots: list = []
            with torch.no_grad():
                z = torch.zeros(1, info.latent_channels, 1, *info.latent_hw, device=self.device, dtype=self.dtype)
                self.vae.decode_step(z, slots, first=True)
            self._vae_cache_shapes = [tuple(s.shape) for s in slots]
        tokens = info.settings.cache_spec.context_frames * self.dit.tokens_per_frame(info.latent_hw)
        return {"kv": (cfg.num_layers, 1, tokens, cfg.num_heads, cfg.head_dim),
                "text_kv": (cfg.num_layers, 1, cfg.text_len, cfg.num_heads, cfg.head_dim),
                "latents": (info.context_chunks, *info.chunk_latent_shape),
                "vae_cache": list(self._vae_cache_shapes)}

    def all_finite(self, x) -> bool:
        return bool(torch.isfinite(x).all())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": str(self.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), "torch": torch.__version__}


def read_model_card(model_dir: str) -> dict:
    """The optional ``rf_runtime.json`` of a model directory (VAE config, stream settings, resolution)."""
    path = os.path.join(model_dir, MODEL_CARD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        card = json.load(f)
    known = {"vae", "stream", "resolution", "text_encoder", "model_card"}
    unknown = set(card) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
    names = {f.name for f in dataclasses.fields(StreamSettings)}
    bad = set(card.get("stream", {})) - names
    if bad:
        raise ConfigError(f"{path}: unknown stream settings {sorted(bad)}; valid are {sorted(names)}")
    return card


def text_encoder_from_card(card: dict, model_dir: str):
    """The text encoder a model directory names: ``{"kind": "hashed", ...}`` in its card, or umT5 files."""
    spec = dict(card.get("text_encoder", {}))
    kind = spec.pop("kind", "umt5")
    if kind == "hashed":
        from rf_runtime.models.hashed_text import HashedTextEncoder

        return HashedTextEncoder(**spec)
    if kind != "umt5":
        raise ConfigError(f"{model_dir}/{MODEL_CARD}: unknown text_encoder kind {kind!r}; use 'umt5' or 'hashed'")
    from rf_runtime.models.text_encoder import load_text_encoder

    return load_text_encoder(model_dir)


def find_vae(model_dir: str) -> str:
    for name in ("Wan2.1_VAE.pth", "vae.safetensors", "vae.pth"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no VAE weights in {model_dir}: expected Wan2.1_VAE.pth or vae.safetensors "
                          "(or pass vae_path=...)")
