"""The fast PyTorch path: static buffers, one graph per step, CUDA graphs, optional torch.compile.

``StaticTorchBackend`` computes what ``TorchBackend`` computes (the same modules, the same
operations in the same order; tested equal), but arranged for a GPU:

- every tensor a stream needs is allocated once, in ``new_stream``: text K/V, the KV cache, the
  chunk latents (two copies: step k writes where step k+1 reads), x0, the chunk's fresh K/V, the
  VAE feature cache, the decoder's pixels, the chunk's uint8 frames and pinned host staging for
  the noise in and the frames out. A chunk allocates nothing but the numpy frames it returns.
- everything that depends only on the step or the cache state is computed once per backend: the
  time embeddings of each step (the model's time MLP on the host's float64 sinusoid), the sigmas,
  the RoPE tables and key masks of each cache state.
- each call is a function of those buffers only (no Python floats that change, no shapes that
  change), so on CUDA it is captured as a CUDA graph the second time it runs with the same key
  (kind, step, cache state, every buffer address) and replayed after; the first run is eager and
  doubles as the warm-up, so nothing runs twice. Chunks 0..W (the cache filling) run eagerly,
  every steady-state chunk replays 4 step graphs, one cache-pass graph and one decoder graph per
  latent frame.
- ``compile=True`` wraps the DiT call and the VAE step in ``torch.compile(dynamic=False)``: the
  inputs are the same tensors every call, so nothing recompiles after the first chunks.
- the host waits for the device once per chunk for the frames (pinned memory, one copy), and
  once more where the streamer asks for timing (``synchronize``, between denoising and decode).

Numbers: the frames equal ``TorchBackend``'s on CPU in fp32 (tests/test_torch_static.py); in bf16
on CUDA the graphs replay the same kernels as the eager run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rf_runtime.backends.base import StateArrays, StreamState
from rf_runtime.cache import commit_chunk
from rf_runtime.errors import ConfigError, InputError
from rf_runtime.sampler import renoise as renoise_fn
from rf_runtime.sampler import x0_from_flow
from rf_runtime.backends.pytorch import TorchBackend, torch


@dataclass
class _StaticStream:
    text_k: object
    text_v: object
    cache_k: object
    cache_v: object
    x: tuple  # ping-pong chunk latents [1, f, C, H, W]
    x0: object
    eps: object
    slots: list  # VAE feature cache, fixed shapes
    z: object  # one latent frame [1, C, 1, H, W], the decoder's input
    pixels_first: object  # [1, 3, t_first, H, W]
    pixels: object  # [1, 3, t, H, W]
    frames: object  # uint8 [T, H, W, 3] of a whole chunk, on the device
    host_frames: object  # the same, pinned host memory
    stage: (
        object  # pinned host staging of the noise: [S, 1, f, C, H, W] (init, then re-noise of steps 0..S-2)
    )
    latents: object  # ring [K, 1, f, C, H, W] of clean latents (prompt switch)
    decoded: int = 0  # latent frames decoded so far
    chunks_committed: int = 0  # chunks written into the KV cache since it was last (re)filled
    graphs: dict = field(default_factory=dict)  # key -> torch.cuda.CUDAGraph
    seen: set = field(default_factory=set)  # keys run once eagerly


def _buffers_key(s: _StaticStream) -> tuple:
    tensors = [
        s.text_k,
        s.text_v,
        s.cache_k,
        s.cache_v,
        *s.x,
        s.x0,
        s.eps,
        *s.slots,
        s.z,
        s.pixels_first,
        s.pixels,
        s.frames,
    ]
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)


class StaticTorchBackend(TorchBackend):
    """``TorchBackend`` with static per-stream buffers, CUDA graphs and optional ``torch.compile``.

    cuda_graphs: capture and replay CUDA graphs (default: on when the model is on a CUDA device;
        asking for them on a CPU is an error).
    compile: ``torch.compile`` the DiT step and the VAE step (``dynamic=False``); True uses the default
        compiler (inductor), a string names another ``torch.compile`` backend (e.g. "eager" in tests).

    No decode overlap (``supports_overlap`` False, as ``TorchBackend``): every graph shares one CUDA graph
    memory pool and one stream, and the decoder reads x0, which the next chunk's steps overwrite.
    """

    name = "torch-static"
    supports_overlap = False

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        settings=None,
        height=None,
        width=None,
        *,
        cuda_graphs: bool | None = None,
        compile: bool | str = False,
    ):
        from rf_runtime.backends.pytorch import DEFAULT_HW

        super().__init__(
            dit,
            vae,
            text_encoder,
            settings,
            DEFAULT_HW[0] if height is None else height,
            DEFAULT_HW[1] if width is None else width,
        )  # 0 is refused there, not replaced
        is_cuda = self.device.type == "cuda"
        if cuda_graphs and not is_cuda:
            raise ConfigError(
                "CUDA graphs need the model on a CUDA device: use device='cuda', or cuda_graphs=False"
            )
        self.cuda_graphs = is_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.compile = compile
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._tables()
        self._dit_call = self.dit.forward_chunk_tables
        self._vae_call = self.vae.decode_step
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._dit_call = torch.compile(self.dit.forward_chunk_tables, dynamic=False, backend=backend)
            self._vae_call = torch.compile(self.vae.decode_step, dynamic=False, backend=backend)

    @classmethod
    def from_dir(cls, model_dir, checkpoint=None, *, cuda_graphs=None, compile=False, **kwargs):
        plain = TorchBackend.from_dir(model_dir, checkpoint, **kwargs)
        h, w = plain.info.frame_hw
        return cls(
            plain.dit,
            plain.vae,
            plain.text_encoder,
            plain.info.settings,
            h,
            w,
            cuda_graphs=cuda_graphs,
            compile=compile,
        )

    # ---- tables shared by every stream ------------------------------------------------------

    def _tables(self) -> None:
        from rf_runtime.models.dit import rope_tables

        info, spec, dit = self.info, self.info.settings.cache_spec, self.dit
        f, m = spec.chunk_frames, spec.context_frames
        grid = dit.grid(info.latent_hw)
        tpf = grid[0] * grid[1]
        dev = self.device
        sched = self.info.settings.schedule()
        self._steps = len(sched.t)
        with torch.no_grad():
            times = (*sched.t, info.settings.context_t)
            self._time = [
                dit.time_embeddings(torch.full((1, f), float(t), dtype=torch.float32, device=dev))
                for t in times
            ]
            self._sigma = [
                *sched.sigma,
                0.0,
            ]  # Python floats, as the reference uses; fixed per step (graph key)
        self._last_state = spec.window_slots + 1
        cos_ctx, sin_ctx = rope_tables(torch.arange(m), grid, dit.config.head_dim)
        self._ctx_rope = (cos_ctx.to(dev), sin_ctx.to(dev))
        self._state_tables = []
        for committed in range(self._last_state + 1):
            valid = spec.valid_frames(committed)
            mask = torch.cat([torch.arange(m * tpf) < valid * tpf, torch.ones(f * tpf, dtype=torch.bool)]).to(
                dev
            )
            cos_q, sin_q = rope_tables(torch.arange(valid, valid + f), grid, dit.config.head_dim)
            self._state_tables.append((mask, cos_q.to(dev), sin_q.to(dev)))
        self._tpf, self._spec = tpf, spec

    def _state(self, committed: int) -> int:
        return min(committed, self._last_state)

    # ---- streams -----------------------------------------------------------------------------

    def new_stream(self, text) -> StreamState:
        dev, dtype, info = self.device, self.dtype, self.info
        cfg = self.dit.config
        shapes = self.state_shapes()
        lat = info.chunk_latent_shape
        pin = dev.type == "cuda"

        def zeros(shape, dt=dtype):
            return torch.zeros(shape, device=dev, dtype=dt)

        text_k, text_v = zeros(shapes["text_kv"]), zeros(shapes["text_kv"])
        text_k.copy_(text[0])
        text_v.copy_(text[1])
        slots = [zeros(s) for s in shapes["vae_cache"]]
        stride = info.vae_stride[0]
        f = info.settings.chunk_frames
        hw = info.frame_hw
        t_first, t_next = 1, stride
        chunk_frames = t_next * f
        s = _StaticStream(
            text_k=text_k,
            text_v=text_v,
            cache_k=zeros(shapes["kv"]),
            cache_v=zeros(shapes["kv"]),
            x=(zeros(lat), zeros(lat)),
            x0=zeros(lat),
            eps=zeros((max(self._steps - 1, 1), *lat)),
            slots=slots,
            z=zeros((1, cfg.in_dim, 1, *info.latent_hw)),
            pixels_first=zeros((1, 3, t_first, *hw)),
            pixels=zeros((1, 3, t_next, *hw)),
            frames=zeros((chunk_frames, *hw, 3), torch.uint8),
            host_frames=torch.zeros((chunk_frames, *hw, 3), dtype=torch.uint8, pin_memory=pin),
            stage=torch.zeros((self._steps, *lat), dtype=torch.float32, pin_memory=pin),
            latents=zeros((info.context_chunks, *lat)),
        )
        return StreamState(s)

    def upload(self, array: np.ndarray):
        return np.ascontiguousarray(array, dtype=np.float32)  # copied into the stream's buffers by the step

    def set_text(self, state, text) -> None:
        s = state.device
        s.text_k.copy_(text[0])
        s.text_v.copy_(text[1])

    # ---- the calls, each eager once, then a CUDA graph --------------------------------------

    def _call(self, s: _StaticStream, key: tuple, fn) -> None:
        """Run ``fn`` (which reads and writes only persistent buffers); on CUDA capture it the second time.
        The key is the call's kind, step and cache state plus the shape and address of every buffer of the
        stream: a buffer that moved (or changed shape) selects a new graph, never a stale one."""
        if not self.cuda_graphs:
            fn()
            return
        key = (*key, _buffers_key(s))
        graph = s.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if key not in s.seen:  # first run: eager, also the warm-up (cuBLAS handles, compile, autotuning)
            s.seen.add(key)
            fn()
            return
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        s.graphs[key] = graph
        graph.replay()

    def _stage(self, s: _StaticStream, slot: int, array: np.ndarray, dst) -> None:
        """Host noise -> pinned staging slot -> device buffer (asynchronous on CUDA). Each slot is
        written once per chunk, after the previous chunk's frames were waited for."""
        staged = s.stage[slot]
        staged.numpy()[...] = array
        dst.copy_(staged, non_blocking=True)

    def _dit(self, s: _StaticStream, x, mask, cos_q, sin_q, time_emb):
        """The DiT on a chunk against this stream's text K/V and cache: (flow, k, v)."""
        return self._dit_call(
            x,
            None,
            s.text_k,
            s.text_v,
            s.cache_k,
            s.cache_v,
            mask,
            *self._ctx_rope,
            cos_q,
            sin_q,
            time_emb=time_emb,
        )

    def denoise_step(self, state, x, step, eps):
        s: _StaticStream = state.device
        cur = step % 2
        if isinstance(x, np.ndarray):
            self._stage(s, 0, x, s.x[cur])
        elif x is not s.x[cur]:
            raise InputError("x must come from this stream (upload() or the previous step), not another one")
        last = step + 1 == self._steps
        if eps is not None and not last:
            self._stage(s, step + 1, eps, s.eps[step])
        st = self._state(state.device.chunks_committed)
        mask, cos_q, sin_q = self._state_tables[st]
        e, e0 = self._time[step]
        sigma, sigma_next = self._sigma[step], self._sigma[step + 1]
        x_in, x_out = s.x[cur], s.x[1 - cur]
        renoise = eps is not None and not last

        def run():
            flow, _, _ = self._dit(s, x_in, mask, cos_q, sin_q, (e, e0))
            s.x0.copy_(x0_from_flow(x_in, flow, sigma))
            if renoise:
                x_out.copy_(renoise_fn(s.x0, s.eps[step], sigma_next))

        with torch.no_grad():
            self._call(s, ("step", step, st, renoise), run)
        return s.x0, (x_out if renoise else None)

    def cache_pass(self, state, x0) -> None:
        s: _StaticStream = state.device
        if x0 is not s.x0:
            if isinstance(x0, torch.Tensor) and any(x0.data_ptr() == r.data_ptr() for r in s.latents):
                s.x0.copy_(x0)  # a prompt switch re-caching a kept chunk
            elif isinstance(x0, np.ndarray):
                s.x0.copy_(torch.from_numpy(x0))
            else:
                raise InputError("x0 must come from this stream's last denoising step or stored_latents()")
        committed = state.device.chunks_committed
        st = self._state(committed)
        mask, cos_q, sin_q = self._state_tables[st]
        e, e0 = self._time[-1]

        def run():
            _, k, v = self._dit(s, s.x0, mask, cos_q, sin_q, (e, e0))
            commit_chunk(self._spec, st, s.cache_k, k, self._tpf)  # states past the last behave like it
            commit_chunk(self._spec, st, s.cache_v, v, self._tpf)

        with torch.no_grad():
            self._call(s, ("cache", st), run)
        state.device.chunks_committed += 1

    def decode(self, state, x0) -> np.ndarray:
        s: _StaticStream = state.device
        if x0 is not s.x0:
            raise InputError("decode() takes the x0 returned by this stream's last denoising step")
        f = x0.shape[1]
        done = 0
        with torch.no_grad():
            for i in range(f):
                first = s.decoded == 0
                s.z.copy_(x0[:, i].unsqueeze(2))
                out = s.pixels_first if first else s.pixels
                t = out.shape[2]

                def run(first=first, out=out, start=done, t=t):
                    slots = list(s.slots)
                    pixels = self._vae_call(s.z, slots, first)
                    for old, new in zip(s.slots, slots):
                        old.copy_(new)
                    out.copy_(pixels.clamp(-1, 1))
                    # to_uint8_frames on the device: clamp(x * 0.5 + 0.5, 0, 1) * 255 + 0.5, truncated
                    y = out[0].float().mul(0.5).add(0.5).clamp(0.0, 1.0).mul(255.0).add(0.5)
                    s.frames[start : start + t].copy_(y.permute(1, 2, 3, 0))

                self._call(s, ("vae", first, i, done), run)
                s.decoded += 1
                done += t
            s.host_frames[:done].copy_(s.frames[:done], non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # the one wait per chunk: the frames
        return s.host_frames[:done].numpy().copy()

    # ---- prompt switch, snapshots --------------------------------------------------------------

    def store_latents(self, state, slot, x0) -> None:
        state.device.latents[slot].copy_(x0 if not isinstance(x0, np.ndarray) else torch.from_numpy(x0))

    def stored_latents(self, state, slot):
        return state.device.latents[slot]

    def set_cache_fill(self, state, chunks_committed) -> None:
        state.device.chunks_committed = chunks_committed

    def export_state(self, state) -> StateArrays:
        s: _StaticStream = state.device

        def host(t):
            return t.detach().float().cpu().numpy().copy()

        return StateArrays(
            cache_k=host(s.cache_k),
            cache_v=host(s.cache_v),
            text_k=host(s.text_k),
            text_v=host(s.text_v),
            latents=host(s.latents),
            vae_cache=tuple(host(t) for t in s.slots) if s.decoded else (),
            chunks_committed=state.device.chunks_committed,
        )

    def import_state(self, arrays: StateArrays, latent_frames_decoded: int) -> StreamState:
        def device(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=self.dtype)

        state = self.new_stream((device(arrays.text_k), device(arrays.text_v)))
        s: _StaticStream = state.device
        s.cache_k.copy_(device(arrays.cache_k))
        s.cache_v.copy_(device(arrays.cache_v))
        s.latents.copy_(device(arrays.latents))
        for slot, a in zip(s.slots, arrays.vae_cache):
            slot.copy_(device(a))
        s.decoded = latent_frames_decoded
        state.device.chunks_committed = arrays.chunks_committed
        return state

    def describe(self) -> dict:
        return {
            **super().describe(),
            "backend": self.name,
            "cuda_graphs": self.cuda_graphs,
            "compile": self.compile,
        }
