"""The PyTorch backend: the reference models run in place, buffers are torch tensors on ``device``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rf_runtime import model_dir
from rf_runtime.backends.base import Backend, ModelInfo, StateArrays, StreamState, to_uint8_frames
from rf_runtime.errors import require
from rf_runtime.model_dir import check_text_encoder, latent_hw_for
from rf_runtime.sampler import StreamSettings

torch = require("torch", "torch")

from rf_runtime.models.rollout import ChunkRollout  # noqa: E402  (after the check that torch is installed)

DEFAULT_HW = model_dir.DEFAULT_HW


@dataclass
class _TorchStream:
    rollout: ChunkRollout  # text K/V, KV cache and the one chunks_committed counter
    decoder: object  # VAEStreamDecoder
    latents: object  # [K, 1, f, C, H, W] ring of the last K chunks' clean latents (for a prompt switch)


class TorchBackend(Backend):
    """The reference models, run in place. No decode overlap (``Backend.supports_overlap`` False): torch's
    intra-op pool is one per process (the VAE cannot get other threads than the DiT), and the reference
    modules run many small ops with the GIL held between them, so a decode thread would mostly wait for
    the denoising thread."""

    name = "torch"

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        settings: StreamSettings | None = None,
        height: int = DEFAULT_HW[0],
        width: int = DEFAULT_HW[1],
    ):
        self.dit, self.vae, self.text_encoder = dit.eval(), vae.eval(), text_encoder
        settings = settings or StreamSettings()
        cfg = dit.config
        check_text_encoder(cfg, text_encoder)
        stride = vae.config.stride
        latent_hw = latent_hw_for(height, width, stride[1], cfg.patch_size[1:])
        self.info = ModelInfo(
            latent_channels=cfg.in_dim, latent_hw=latent_hw, vae_stride=stride, settings=settings
        )
        self.device = dit.patch_embedding.weight.device
        self.dtype = dit.patch_embedding.weight.dtype
        self._vae_cache_shapes = None  # found on first use by decoding one frame

    @classmethod
    def from_dir(
        cls,
        path,
        checkpoint=None,
        *,
        vae_path=None,
        text_encoder=None,
        settings=None,
        height=None,
        width=None,
        device="cpu",
        dtype="float32",
        use_ema=True,
    ) -> "TorchBackend":
        """The models of a model folder (``rf_runtime.model_dir``) on ``device`` in ``dtype``."""
        m = model_dir.load(
            path,
            checkpoint,
            vae_path=vae_path,
            text_encoder=text_encoder,
            settings=settings,
            use_ema=use_ema,
            device=device,
            dtype=dtype,
        )
        hw = m.resolution
        return cls(
            m.dit,
            m.vae,
            m.text_encoder,
            m.settings,
            hw[0] if height is None else height,  # 0 is refused
            hw[1] if width is None else width,
        )

    # ---- Backend ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str):
        with torch.no_grad():
            embeds = torch.as_tensor(self.text_encoder.encode([prompt]))
            return self.dit.text_kv(embeds.to(device=self.device, dtype=self.dtype))

    def new_stream(self, text) -> StreamState:
        rollout = ChunkRollout(self.dit, text, 1, self.info.latent_hw, self.info.settings)
        latents = torch.zeros(
            (self.info.context_chunks, *self.info.chunk_latent_shape), device=self.device, dtype=self.dtype
        )
        return StreamState(_TorchStream(rollout, self.vae.stream_decoder(batch_size=1), latents))

    def upload(self, array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=self.dtype)

    def denoise_step(self, state: StreamState, x, step: int, eps):
        with torch.no_grad():
            return state.device.rollout.denoise_step(x, step, eps)

    def cache_pass(self, state: StreamState, x0) -> None:
        with torch.no_grad():
            state.device.rollout.cache_pass(x0)

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

    def export_state(self, state: StreamState) -> StateArrays:
        dev = state.device

        def host(t):
            return t.detach().float().cpu().numpy().copy()

        return StateArrays(
            cache_k=host(dev.rollout.cache_k),
            cache_v=host(dev.rollout.cache_v),
            text_k=host(dev.rollout.text_k),
            text_v=host(dev.rollout.text_v),
            latents=host(dev.latents),
            vae_cache=tuple(host(s) for s in dev.decoder.slots),
            chunks_committed=dev.rollout.chunks_committed,
        )

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
                z = torch.zeros(
                    1, info.latent_channels, 1, *info.latent_hw, device=self.device, dtype=self.dtype
                )
                self.vae.decode_step(z, slots, first=True)
            self._vae_cache_shapes = [tuple(s.shape) for s in slots]
        tokens = info.settings.cache_spec.context_frames * self.dit.tokens_per_frame(info.latent_hw)
        return {
            "kv": (cfg.num_layers, 1, tokens, cfg.num_heads, cfg.head_dim),
            "text_kv": (cfg.num_layers, 1, cfg.text_len, cfg.num_heads, cfg.head_dim),
            "latents": (info.context_chunks, *info.chunk_latent_shape),
            "vae_cache": list(self._vae_cache_shapes),
        }

    def all_finite(self, x) -> bool:
        return bool(torch.isfinite(x).all())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "overlap": self.overlap,
            "torch": torch.__version__,
        }
