"""Running an engine bundle through onnxruntime, without torch.

Per stream, the text K/V, the KV cache and the VAE feature cache are arrays kept between calls;
the position tables and masks of the three cache states (chunk 0, chunk 1, steady state) are
computed once per backend. This first version hands numpy arrays to ``InferenceSession.run``;
IOBinding with preallocated device buffers and the TensorRT runner are still to come (issue 3).
"""

from __future__ import annotations

import numpy as np

from rf_runtime.backend import Backend, ModelInfo, StreamState, to_uint8_frames
from rf_runtime.bundle import Bundle
from rf_runtime.cache import commit_matrix
from rf_runtime.errors import ConfigError, require
from rf_runtime.positions import rope_tables_np, timestep_sinusoid_np
from rf_runtime.sampler import StreamSettings


# The fp32 graphs this backend runs (a bundle may also hold fp16 / bf16 variants and tokenizer files).
FP32_GRAPHS = ("dit_step", "text_kv", "cache_update", "vae_decode_first", "vae_decode")


class EngineBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers=("CPUExecutionProvider",)):
        ort = require("onnxruntime", "cpu")
        m = bundle.manifest
        self.bundle = bundle
        self.model = m["model"]
        settings = StreamSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["stream"].items()})
        self.info = ModelInfo(latent_channels=self.model["latent_channels"], latent_hw=tuple(self.model["latent_hw"]),
                              vae_stride=tuple(self.model["vae_stride"]), settings=settings, fps=self.model["fps"])
        self.sessions = {name: ort.InferenceSession(bundle.file(name), providers=list(providers))
                         for name in FP32_GRAPHS}
        self.text_encoder = _text_encoder(m["text_encoder"], bundle, providers)
        dit = self.model["dit"]
        self.spec = settings.cache_spec
        self.schedule = settings.schedule()
        grid = tuple(self.model["grid_hw"])
        tpf = grid[0] * grid[1]
        head_dim = dit["dim"] // dit["num_heads"]
        c, m_frames = self.spec.chunk_frames, self.spec.context_frames
        cos_ctx, sin_ctx = rope_tables_np(range(m_frames), grid, head_dim)
        self._positions = {}
        for valid in {self.spec.valid_frames(n) for n in range(self.spec.window_slots + 3)}:
            cos_q, sin_q = rope_tables_np(range(valid, valid + c), grid, head_dim)
            mask = np.concatenate([np.arange(m_frames * tpf) < valid * tpf, np.ones(c * tpf, bool)]).astype(np.float32)
            self._positions[valid] = {"cos_ctx": cos_ctx, "sin_ctx": sin_ctx, "cos_q": cos_q, "sin_q": sin_q,
                                      "key_mask": mask}
        self._t_freq = [timestep_sinusoid_np(np.full((1, c), t), dit["freq_dim"]).astype(np.float32)
                        for t in (*self.schedule.t, settings.context_t)]
        self._kv_shape = (dit["num_layers"], 1, m_frames * tpf, dit["num_heads"], head_dim)
        self._vae_inputs = [i.name for i in self.sessions["vae_decode"].get_inputs()][1:]

    @classmethod
    def load(cls, path, backend: str = "auto", device: str = "cpu") -> "EngineBackend":
        if backend not in ("auto", "onnxruntime"):
            raise ConfigError(f"backend {backend!r} is not available yet: use 'onnxruntime' (TensorRT is planned)")
        providers = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return cls(Bundle.load(path), providers)

    def encode_prompt(self, prompt: str):
        embeds = self.text_encoder.encode([prompt]).astype(np.float32)
        return tuple(self.sessions["text_kv"].run(None, {"text_embeds": embeds}))

    def new_stream(self, text) -> StreamState:
        zeros = np.zeros(self._kv_shape, np.float32)
        return StreamState({"text": text, "ctx_k": zeros, "ctx_v": zeros.copy(), "vae": None})

    def upload(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def _step(self, state, x, t_index, sigma, sigma_next, eps):
        dev = state.device
        feeds = {"x": x, "eps": eps if eps is not None else np.zeros_like(x), "t_freq": self._t_freq[t_index],
                 "sigma": np.array([sigma], np.float32), "sigma_next": np.array([sigma_next], np.float32),
                 "text_k": dev["text"][0], "text_v": dev["text"][1], "ctx_k": dev["ctx_k"], "ctx_v": dev["ctx_v"],
                 **self._positions[self.spec.valid_frames(state.chunks_committed)]}
        return self.sessions["dit_step"].run(None, feeds)

    def denoise_step(self, state, x, step, eps):
        last = step + 1 == len(self.schedule.t)
        sigma_next = 0.0 if last else self.schedule.sigma[step + 1]
        x0, x_next, _, _ = self._step(state, x, step, self.schedule.sigma[step], sigma_next, eps)
        return x0, (None if last else x_next)

    def cache_pass(self, state, x0) -> None:
        _, _, new_k, new_v = self._step(state, x0, len(self.schedule.t), 0.0, 0.0, None)
        dev = state.device
        mix = commit_matrix(self.spec, state.chunks_committed).astype(np.float32)
        dev["ctx_k"], dev["ctx_v"] = self.sessions["cache_update"].run(
            None, {"ctx_k": dev["ctx_k"], "ctx_v": dev["ctx_v"], "new_k": new_k, "new_v": new_v, "mix": mix})
        state.chunks_committed += 1

    def decode(self, state, x0) -> np.ndarray:
        dev = state.device
        z = x0.transpose(0, 2, 1, 3, 4)  # [1, C, f, H, W]
        parts = []
        for i in range(z.shape[2]):
            zi = np.ascontiguousarray(z[:, :, i:i + 1])
            if dev["vae"] is None:
                frames, *dev["vae"] = self.sessions["vae_decode_first"].run(None, {"z": zi})
            else:
                frames, *dev["vae"] = self.sessions["vae_decode"].run(
                    None, {"z": zi, **dict(zip(self._vae_inputs, dev["vae"]))})
            parts.append(frames)
        return to_uint8_frames(np.concatenate(parts, axis=2)[0])


def _text_encoder(spec: dict, bundle: Bundle, providers):
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "umt5":  # the exported umT5 graph with its tokenizer (rf_runtime/text_onnx.py)
        from rf_runtime.text_onnx import OnnxTextEncoder

        return OnnxTextEncoder.from_bundle(bundle.path, {"kind": kind, **spec}, bundle.manifest["files"], providers)
    if kind != "hashed":
        raise ConfigError(f"bundle text encoder {kind!r} is not supported by the engine runtime yet")
    from rf_runtime.models.hashed_text import HashedTextEncoder

    return HashedTextEncoder(**spec)
