"""Running an engine bundle through the runners (onnxruntime or TensorRT), without torch.

One ``EngineBackend`` holds one runner per graph (sessions / engines loaded once) and the tables
every stream shares, precomputed once: the timestep sinusoid of each step, the sigmas, the RoPE
tables and key masks of each cache state, the cache-commit matrices. Each stream then allocates
its buffers once, in ``new_stream``, and binds them once:

    text K/V (per prompt) | KV cache, two copies (ping-pong: the cache update cannot write its input)
    chunk latents x, two copies (step k writes x_next where step k+1 reads x) | x0 | eps
    the chunk's new K/V | VAE feature cache, two copies | the decoded pixels of one latent frame
    the clean latents of the last chunks the cache holds (a ring, re-cached by a prompt switch)

A umT5 bundle's ``text_encoder`` graph gets a runner too (run once per prompt by
``rf_runtime.text.umt5_onnx.OnnxTextEncoder``, with the bundle's tokenizer), so no torch is needed.

Per chunk only buffer addresses are rebound, x0 is copied into its ring slot, nothing is allocated,
and the only new array is the uint8 frames returned to the caller. Several streams can run on one backend:
they share the runners and tables, never buffers.
"""

from __future__ import annotations

import dataclasses

import logging
import threading
from dataclasses import dataclass

import numpy as np

from rf_runtime import graph_io
from rf_runtime.backends.base import (
    Backend,
    ModelInfo,
    StateArrays,
    StreamState,
    choose_overlap,
    to_uint8_frames,
)
from rf_runtime.backends.select import choose_backend, plan_names
from rf_runtime.bundle import MANIFEST, Bundle, BundleError, batch_graph_names, batch_sizes
from rf_runtime.cache import commit_matrix
from rf_runtime.errors import InputError, RFError
from rf_runtime.graph_io import (
    CACHE_UPDATE,
    DIT_STEP,
    GRAPHS,
    TEXT_ENCODER,
    TEXT_KV,
    VAE_DECODE,
    VAE_DECODE_FIRST,
)
from rf_runtime.positions import chunk_tables, timestep_sinusoid_np
from rf_runtime.runners import Binding, Buffer, OnnxRuntimeRunner, Runner, TensorRTRunner
from rf_runtime.runners.base import write_host
from rf_runtime.runners.onnxruntime_runner import CpuThreads, usable_cores
from rf_runtime.sampler import StreamSettings
from rf_runtime.text import text_encoder_from_spec

logger = logging.getLogger("rf_runtime")

VAE_GRAPHS = (VAE_DECODE_FIRST, VAE_DECODE)


def cpu_threads(
    graph: str, threads: CpuThreads | int | None, cores: int | None = None, overlap: bool = False
) -> CpuThreads:
    """The CPU threading of one graph's onnxruntime session.

    threads: a ``CpuThreads`` (or an int: that many intra-op threads) for every graph; None chooses
    from the machine: every usable core for the VAE graphs (2-D convolutions on 64x64 and larger
    maps split well over threads), one thread for the DiT step, the cache update and the text graphs
    (hundreds of small ops each: a second thread adds synchronisation and no speed), no spinning.
    overlap (the decode of chunk n runs beside the denoising of chunk n+1, ``Backend.overlap``): the
    VAE graphs get every usable core but the one the DiT runs on (at least one).
    With several streams running at once give ``threads=1``: the streams then run in parallel
    on the cores instead of each one's threads competing for them (docs/notes/speed.md).
    """
    if threads is not None:
        return CpuThreads(threads) if isinstance(threads, int) else threads
    if graph not in VAE_GRAPHS:
        return CpuThreads(1)
    cores = cores or usable_cores()
    return CpuThreads(max(1, cores - 1) if overlap else cores)


@dataclass
class _Stream:
    """The buffers and bindings of one stream (allocated and bound once, in new_stream)."""

    dit: Binding
    updates: tuple[Binding, Binding]  # cache update reading copy 0 / copy 1 of the KV cache
    vae_first: Binding
    vae: tuple[Binding, Binding]  # VAE step reading copy 0 / copy 1 of the feature cache
    kv: tuple[tuple[Buffer, Buffer], tuple[Buffer, Buffer]]  # (k, v) of cache copy 0 and 1
    x: tuple[Buffer, Buffer]  # ping-pong chunk latents
    x0: Buffer  # the step's x0 prediction; after the last step, the chunk's clean latents
    z: tuple[Buffer, ...]  # latent frame i of x0, as the VAE's input shape (views, no copies)
    scratch: np.ndarray  # float32 [3, frames per latent frame, H, W], for the uint8 conversion
    latents: tuple[Buffer, ...]  # ring of the last context_chunks chunks' clean latents (for a prompt switch)
    x_cur: int = 0  # which of x holds the current step's input
    kv_cur: int = 0  # which cache copy is current
    vae_cur: int = 0  # which VAE cache copy is current
    vae_started: bool = False
    chunks_committed: int = 0  # chunks written into the KV cache since it was last (re)filled
    row_x0: Buffer | None = None  # while the stream is a row of a batched chunk: its x0 in the batch
    ring_z: tuple[tuple[Buffer, ...], ...] = ()  # per ring slot, its latent frames as VAE inputs (views):
    # what an overlapped decode reads, since the next chunk's steps overwrite x0 meanwhile


@dataclass
class _Group:
    """The buffers and bindings of one batched chunk of ``size`` rows (allocated once per size and reused:
    a pool per size, so chunks of several groups may run at once). Rows beyond the real ones are padding:
    copies of row 0's inputs, their outputs never read."""

    size: int
    dit: Binding  # the batched DiT step
    update: Binding  # the batched cache update: ctx_k/ctx_v (the gathered cache) -> ctx_k_out/ctx_v_out
    vae_first: Binding
    vae: tuple[Binding, Binding]  # VAE step reading cache copy 0 / copy 1
    x: tuple[Buffer, Buffer]
    x0: Buffer
    x_rows: tuple[tuple[Buffer, ...], tuple[Buffer, ...]]  # row views of x[0] and x[1]
    x0_rows: tuple[Buffer, ...]  # row views of x0
    eps_rows: tuple[Buffer, ...]  # row views of eps
    scratch: np.ndarray
    states: list = None  # the rows' StreamStates while a chunk runs
    x_cur: int = 0
    vae_cur: int = 0


class EngineBackend(Backend):
    def __init__(
        self,
        bundle: Bundle,
        backend: str = "onnxruntime",
        device: str = "cpu",
        *,
        cuda_graph: bool = False,
        threads: CpuThreads | int | None = None,
        ema_alpha: float | None = None,
        overlap: bool | None = None,
    ):
        m = bundle.manifest
        self.bundle, self.name, self.device = bundle, backend, device
        # the decode may overlap the next chunk's denoising on onnxruntime CPU: host buffers, sessions
        # that release the GIL, and a VAE that reads a ring slot the steps never write. Not on CUDA (one
        # device stream; the runners' device copies go through the host) nor TensorRT.
        self.supports_overlap = backend == "onnxruntime" and device == "cpu"
        self.overlap = choose_overlap(
            overlap,
            supported=self.supports_overlap,
            threads_given=threads is not None,
            cores=usable_cores(),
            backend=f"{backend} ({device})",
        )
        self.model = m["model"]
        settings = StreamSettings.from_dict(m["stream"], f"{bundle.path}/{MANIFEST}")
        if ema_alpha is not None:
            # the EMA-Sink rate is an input of the cache-update graph (its `mix` matrix), not baked into
            # it: any rate in [0, 1] runs on the same graphs (1 = a static sink). StreamSettings validates it.
            settings = dataclasses.replace(settings, ema_alpha=ema_alpha)
        self.info = ModelInfo(
            latent_channels=self.model["latent_channels"],
            latent_hw=tuple(self.model["latent_hw"]),
            vae_stride=tuple(self.model["vae_stride"]),
            settings=settings,
            fps=self.model["fps"],
        )
        self.model_card = bundle.model_card
        self.model_card.check_settings(settings, self.info.frame_hw)
        self.spec = settings.cache_spec
        self.schedule = settings.schedule()
        _warn_if_too_large(bundle, backend, device)
        self.runners = self._make_runners(backend, device, cuda_graph, threads)
        for graph, runner in self.runners.items():
            _activate(runner, graph, bundle.path)
        self._threads = threads
        self._batch_sizes = batch_sizes(m)
        self._batched: dict[int, dict[str, Runner]] = {}  # batch size -> runners, loaded on first use
        self._groups: dict[int, list[_Group]] = {}  # batch size -> free groups of buffers
        self._batch_lock = threading.Lock()
        self.text_encoder = text_encoder_from_spec(
            m["text_encoder"],
            f"{bundle.path}/{MANIFEST}",
            bundle_dir=bundle.path,
            runner=self.runners.get(TEXT_ENCODER),
        )
        self._check_geometry()
        self._tables()

    @classmethod
    def load(cls, path, backend: str = "auto", device: str = "cpu", **options) -> "EngineBackend":
        bundle = Bundle.load(path)
        return cls(bundle, choose_backend(bundle, backend, device), device, **options)

    def _make_runners(self, backend, device, cuda_graph, threads) -> dict[str, Runner]:
        b = self.bundle
        missing = [g for g in GRAPHS if g not in b.graphs]
        if missing:
            raise BundleError(f"{b.path} lacks the graphs {missing}; rebuild it with `rf-export onnx`")
        if backend == "tensorrt":
            plans = plan_names(b)
            runners = {
                g: TensorRTRunner(
                    b.file(b.plans[plans[g]]["file"]),
                    b.graphs[plans[g]],
                    cuda_graph=cuda_graph,
                    name=plans[g],
                )
                for g in GRAPHS
            }
        else:
            runners = {
                g: OnnxRuntimeRunner(
                    b.graph_file(g),
                    b.graphs[g],
                    device=device,
                    threads=cpu_threads(g, threads, overlap=self.overlap) if device == "cpu" else None,
                )
                for g in GRAPHS
            }
        if b.manifest["text_encoder"].get("kind") == "umt5":  # the umT5 graph: once per prompt
            graph = b.manifest["text_encoder"]["graph"]  # Bundle.load checked that it is one of the graphs
            if backend == "tensorrt" and graph in b.plans:
                runners[TEXT_ENCODER] = TensorRTRunner(
                    b.file(b.plans[graph]["file"]), b.graphs[graph], name=graph
                )
            else:
                if backend == "tensorrt":
                    logger.info(
                        "bundle %s has no TensorRT plan for %s: the text encoder runs on onnxruntime (%s); "
                        "`rf-export trt BUNDLE --precision fp32 --graphs %s` builds one",
                        b.path,
                        graph,
                        device,
                        graph,
                    )
                runners[TEXT_ENCODER] = OnnxRuntimeRunner(
                    b.graph_file(graph),
                    b.graphs[graph],
                    device=device,
                    name=graph,
                    threads=cpu_threads(TEXT_ENCODER, threads) if device == "cpu" else None,
                )
        return runners

    def _check_geometry(self) -> None:
        """The graphs' tensor names must be the contract's (``rf_runtime.graph_io``), and their shapes
        the ones the manifest's model and stream settings imply."""
        dit, r = self.model["dit"], self.runners
        slots = len(self._vae_cache_names())
        for name, runner in r.items():
            problem = graph_io.mismatch(name, runner.graph.input_names(), runner.graph.output_names(), slots)
            if problem:
                raise BundleError(
                    f"graph {runner.name} of {self.bundle.path}: {problem}; rebuild the bundle with "
                    "`rf-export onnx`"
                )
        grid = tuple(self.model["grid_hw"])
        self.tokens_per_frame = tpf = grid[0] * grid[1]
        c, m = self.spec.chunk_frames, self.spec.context_frames
        head_dim = dit["dim"] // dit["num_heads"]
        kv = (dit["num_layers"], 1, m * tpf, dit["num_heads"], head_dim)
        lat = (1, c, self.info.latent_channels, *self.info.latent_hw)
        expect = {
            (DIT_STEP, "x"): lat,
            (DIT_STEP, "ctx_k"): kv,
            (CACHE_UPDATE, "ctx_k"): kv,
            (CACHE_UPDATE, "mix"): (m, m + c),
            (TEXT_KV, "text_embeds"): (1, dit["text_len"], dit["text_dim"]),
        }
        for (graph, tensor), shape in expect.items():
            actual = r[graph].graph.tensors[tensor].shape
            if actual != shape:
                raise BundleError(
                    f"graph {graph}: {tensor} is {list(actual)}, but the manifest's model and stream "
                    f"settings need {list(shape)}; rebuild it with `rf-export onnx`"
                )
        self._kv_shape, self._grid, self._head_dim = kv, grid, head_dim

    def _tables(self) -> None:
        """Everything that depends only on the step or the cache state, on the device, once."""
        dit, upd = self.runners[DIT_STEP], self.runners[CACHE_UPDATE]
        c, m = self.spec.chunk_frames, self.spec.context_frames
        sched, freq_dim = self.schedule, self.model["dit"]["freq_dim"]

        def const(runner, name, array):  # a buffer for input ``name``, in the graph's dtype
            buf = runner.allocate(array.shape, runner.graph.tensors[name].dtype)
            runner.write(buf, array)
            return buf

        # denoising steps 0..S-1, then the clean-context pass
        t_all = (*sched.t, self.info.settings.context_t)
        sig = (*sched.sigma, 0.0)
        sig_next = (*sched.sigma[1:], 0.0, 0.0)
        self._steps = [
            {
                "t_freq": const(dit, "t_freq", timestep_sinusoid_np(np.full((1, c), t), freq_dim)),
                "sigma": const(dit, "sigma", np.array([s], np.float32)),
                "sigma_next": const(dit, "sigma_next", np.array([sn], np.float32)),
            }
            for t, s, sn in zip(t_all, sig, sig_next)
        ]
        # cache states: chunks committed 0, 1, ..., then every later count behaves like the last
        self._last_state = self.spec.window_slots + 1
        self._states, self._mixes = [], []
        for committed in range(self._last_state + 1):
            tables = chunk_tables(m, c, self.spec.valid_frames(committed), self._grid, self._head_dim)
            if committed == 0:
                self._ctx_tables = {n: const(dit, n, tables[n]) for n in graph_io.CONTEXT_TABLES}
            self._states.append({n: const(dit, n, tables[n]) for n in graph_io.STATE_TABLES})
            self._mixes.append(const(upd, "mix", commit_matrix(self.spec, committed)))

    # ---- Backend ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[Buffer, Buffer]:
        """Text embeddings -> cross-attention K/V buffers of every layer (once per prompt)."""
        runner = self.runners[TEXT_KV]
        b = runner.bind()
        runner.write(b["text_embeds"], self.text_encoder.encode([prompt]).astype(np.float32))
        runner.run(b)
        return b["text_k"], b["text_v"]

    def new_stream(self, text) -> StreamState:
        r = self.runners
        dit, upd = r[DIT_STEP], r[CACHE_UPDATE]
        kv = tuple(
            (
                dit.allocate(self._kv_shape, _dtype(dit, "ctx_k")),
                dit.allocate(self._kv_shape, _dtype(dit, "ctx_v")),
            )
            for _ in range(2)
        )
        x_spec = dit.graph.tensors["x"]
        x = (dit.allocate(x_spec.shape, x_spec.dtype), dit.allocate(x_spec.shape, x_spec.dtype))
        b_dit = dit.bind(
            {
                "x": x[0],
                "x_next": x[1],
                "text_k": text[0],
                "text_v": text[1],
                "ctx_k": kv[0][0],
                "ctx_v": kv[0][1],
                **self._steps[0],
                **self._ctx_tables,
                **self._states[0],
            }
        )
        updates = tuple(
            upd.bind(
                {
                    "ctx_k": kv[i][0],
                    "ctx_v": kv[i][1],
                    "ctx_k_out": kv[1 - i][0],
                    "ctx_v_out": kv[1 - i][1],
                    "new_k": b_dit["new_k"],
                    "new_v": b_dit["new_v"],
                    "mix": self._mixes[0],
                }
            )
            for i in range(2)
        )
        z = self._latent_frames(b_dit["x0"])
        first, step = r[VAE_DECODE_FIRST], r[VAE_DECODE]
        caches = self._vae_cache_names()
        copies = tuple(
            {n: step.allocate(step.graph.tensors[n].shape, step.graph.tensors[n].dtype) for n in caches}
            for _ in range(2)
        )
        vae_first = first.bind({"z": z[0], **{f"{n}_out": copies[0][n] for n in caches}})
        vae = tuple(
            step.bind({"z": z[0], **copies[i], **{f"{n}_out": copies[1 - i][n] for n in caches}})
            for i in range(2)
        )
        frames = step.graph.tensors["frames"].shape  # [1, 3, t, H, W]
        scratch = np.zeros(frames[1:], np.float32)
        latents = tuple(dit.allocate(x_spec.shape, x_spec.dtype) for _ in range(self.info.context_chunks))
        ring_z = tuple(self._latent_frames(b) for b in latents)
        return StreamState(
            _Stream(b_dit, updates, vae_first, vae, kv, x, b_dit["x0"], z, scratch, latents, ring_z=ring_z)
        )

    def _vae_cache_names(self) -> list[str]:
        """The VAE step's feature-cache inputs, in the decoder's slot order."""
        return [n for n in self.runners[VAE_DECODE].graph.input_names() if n != "z"]

    def set_text(self, state: StreamState, text) -> None:
        """Point a stream at other text K/V (from ``encode_prompt``): a prompt switch, no copies."""
        state.device.dit.update({"text_k": text[0], "text_v": text[1]})

    def _latent_frames(self, x0: Buffer) -> tuple[Buffer, ...]:
        """Views of x0 [1, f, C, H, W] as the VAE's per-frame input [1, C, 1, H, W] (frame i is contiguous)."""
        z_shape = self.runners[VAE_DECODE].graph.tensors["z"].shape
        per = int(np.prod(z_shape))
        return tuple(x0.view(i * per, z_shape) for i in range(x0.shape[1]))

    def upload(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)  # copied into the stream's buffers by the step

    def _state_tables(self, s: StreamState) -> dict:
        return self._states[min(s.device.chunks_committed, self._last_state)]

    def _input(self, buffers, value, what: str) -> int:
        """Index of the buffer in ``buffers`` that holds ``value``; a host array is written into buffers[0]."""
        for i, b in enumerate(buffers):
            if value is b:
                return i
        if isinstance(value, Buffer):
            raise InputError(
                f"{what} must come from this stream (upload() or the previous step), not another one"
            )
        self.runners[DIT_STEP].write(buffers[0], value)
        return 0

    def denoise_step(self, state, x, step, eps):
        s: _Stream = state.device
        dit = self.runners[DIT_STEP]
        cur = s.x_cur = self._input(s.x, x, "x")
        if eps is not None:
            dit.write(s.dit["eps"], eps)
        b = s.dit
        b.update(
            {
                "x": s.x[cur],
                "x_next": s.x[1 - cur],
                "x0": s.x0,
                "ctx_k": s.kv[s.kv_cur][0],
                "ctx_v": s.kv[s.kv_cur][1],
            }
        )
        b.update(self._steps[step])
        b.update(self._state_tables(state))
        dit.run(b)
        s.x_cur = 1 - cur
        last = step + 1 == len(self.schedule.t)
        return s.x0, (None if last else s.x[s.x_cur])

    def cache_pass(self, state, x0) -> None:
        s: _Stream = state.device
        x0_buf = s.x0
        if any(x0 is b for b in s.latents):  # a prompt switch re-caching a kept chunk
            x0_buf = x0
        elif x0 is not x0_buf:
            if isinstance(x0, Buffer):
                raise InputError("x0 must come from this stream's last denoising step or stored_latents()")
            self.runners[DIT_STEP].write(x0_buf, x0)
        b = s.dit
        # rerun with timestep zero to write the chunk's clean K/V; x0 / x_next land in scratch buffers
        b.update(
            {
                "x": x0_buf,
                "x0": s.x[0],
                "x_next": s.x[1],
                "ctx_k": s.kv[s.kv_cur][0],
                "ctx_v": s.kv[s.kv_cur][1],
            }
        )
        b.update(self._steps[-1])
        b.update(self._state_tables(state))
        self.runners[DIT_STEP].run(b)
        # commit: evict the oldest window chunk, fold it into the sink, write the new chunk
        u = s.updates[s.kv_cur]
        u.set("mix", self._mixes[min(s.chunks_committed, self._last_state)])
        self.runners[CACHE_UPDATE].run(u)
        s.kv_cur = 1 - s.kv_cur
        s.chunks_committed += 1

    def decode(self, state, x0) -> np.ndarray:
        """Decode x0 (the last step's, or a ring slot from ``stored_latents``: what an overlapped decode
        reads) through the VAE; touches only the VAE bindings, the VAE cache and the scratch."""
        s: _Stream = state.device
        z = s.z if x0 is s.x0 else next((zs for b, zs in zip(s.latents, s.ring_z) if x0 is b), None)
        if z is None:
            raise InputError(
                "decode() takes the x0 returned by this stream's last denoising step or stored_latents()"
            )
        first, step = self.runners[VAE_DECODE_FIRST], self.runners[VAE_DECODE]
        t_first = first.graph.tensors["frames"].shape[2]
        t_step = step.graph.tensors["frames"].shape[2]
        f = len(z)
        n = (t_first + (f - 1) * t_step) if not s.vae_started else f * t_step
        h, w = step.graph.tensors["frames"].shape[3:]
        out = np.empty((n, h, w, 3), np.uint8)  # the one allocation per chunk: the frames returned
        done = 0
        for i in range(f):
            if not s.vae_started:
                runner, b = first, s.vae_first
                s.vae_started, s.vae_cur = True, 0
            else:
                runner, b = step, s.vae[s.vae_cur]
                s.vae_cur = 1 - s.vae_cur
            b.set("z", z[i])
            runner.run(b)
            pixels = runner.read(b["frames"])[0]  # [3, t, H, W]
            t = pixels.shape[1]
            to_uint8_frames(pixels, out[done : done + t], s.scratch[:, :t])
            done += t
        return out

    # ---- several streams in one call (Backend.gather ..., rf_runtime.batching) -----------------------

    def batch_sizes(self) -> tuple[int, ...]:
        """The bundle's batch sizes (``manifest["batch"]``) on onnxruntime CPU; (1,) elsewhere (the
        batched graphs are fp32 onnxruntime graphs; the row gathering works on host buffers)."""
        if self.name != "onnxruntime" or self.device != "cpu":
            return (1,)
        return self._batch_sizes

    def _batch_runners(self, size: int) -> dict[str, Runner]:
        """The runners of the batch-``size`` graphs, loaded on first use (a backend that never batches
        pays nothing for them) and checked against the batch-1 graphs' shapes with ``size`` rows."""
        with self._batch_lock:
            runners = self._batched.get(size)
            if runners is not None:
                return runners
            b, runners = self.bundle, {}
            for graph, name in batch_graph_names(b.manifest, size).items():
                runner = OnnxRuntimeRunner(
                    b.graph_file(name),
                    b.graphs[name],
                    device="cpu",
                    name=name,
                    threads=cpu_threads(graph, self._threads),
                )
                _activate(runner, name, b.path)
                slots = len(self._vae_cache_names())
                problem = graph_io.mismatch(
                    graph, runner.graph.input_names(), runner.graph.output_names(), slots
                )
                if problem:
                    raise BundleError(
                        f"graph {name} of {b.path}: {problem}; rebuild the bundle with `rf-export onnx`"
                    )
                one = self.runners[graph].graph.tensors
                for t in (*runner.graph.inputs, *runner.graph.outputs):
                    want = _batched_shape(graph, t.name, one[t.name].shape, size) if t.name in one else None
                    if t.shape != want:
                        raise BundleError(
                            f"graph {name} of {b.path}: {t.name} is {list(t.shape)}, a batch-{size} "
                            f"{graph} needs {None if want is None else list(want)}; rebuild it with "
                            "`rf-export onnx --batch-sizes`"
                        )
                runners[graph] = runner
            self._batched[size] = runners
            return runners

    def _new_group(self, size: int) -> _Group:
        r = self._batch_runners(size)
        dit, upd, first, step = r[DIT_STEP], r[CACHE_UPDATE], r[VAE_DECODE_FIRST], r[VAE_DECODE]
        spec = dit.graph.tensors["x"]
        x = (dit.allocate(spec.shape, spec.dtype), dit.allocate(spec.shape, spec.dtype))
        # the step and context tables are the same for every row: bind the backend's own (host) buffers
        b_dit = dit.bind({"x": x[0], "x_next": x[1], **self._steps[0], **self._ctx_tables})
        b_upd = upd.bind({n: b_dit[n] for n in ("ctx_k", "ctx_v", "new_k", "new_v")})
        row = (1, *spec.shape[1:])
        per = int(np.prod(row))

        def rows(buffer):
            return tuple(buffer.view(i * per, row) for i in range(size))

        caches = self._vae_cache_names()
        st = step.graph.tensors
        copies = tuple({n: step.allocate(st[n].shape, st[n].dtype) for n in caches} for _ in range(2))
        z = step.allocate(st["z"].shape, st["z"].dtype)
        vae = tuple(
            step.bind({"z": z, **copies[i], **{f"{n}_out": copies[1 - i][n] for n in caches}})
            for i in range(2)
        )
        vae_first = first.bind({"z": z})
        scratch = np.zeros(st["frames"].shape[1:], np.float32)
        return _Group(
            size,
            b_dit,
            b_upd,
            vae_first,
            vae,
            x,
            b_dit["x0"],
            (rows(x[0]), rows(x[1])),
            rows(b_dit["x0"]),
            rows(b_dit["eps"]),
            scratch,
        )

    def gather(self, states):
        """Copy the rows' text K/V, KV cache, cache-state tables and VAE cache into the buffers of a batch
        of the smallest exported size >= len(states) (``rf_runtime.batching`` splits larger sets)."""
        n = len(states)
        size = next((b for b in self.batch_sizes() if b >= n), None)
        if size is None:
            raise InputError(
                f"{n} rows do not fit one call: this bundle's batch sizes are {list(self.batch_sizes())}"
            )
        if n < 2:
            return super().gather(states)
        with self._batch_lock:
            pool = self._groups.setdefault(size, [])
            group = pool.pop() if pool else None
        if group is None:
            group = self._new_group(size)
        group.states = list(states)
        d, mix, vae = group.dit, group.update["mix"].host, group.vae[0]
        for i in range(size):
            s: _Stream = states[i if i < n else 0].device  # padding rows: copies of row 0
            k, v = s.kv[s.kv_cur]
            for name, source in (
                ("text_k", s.dit["text_k"]),
                ("text_v", s.dit["text_v"]),
                ("ctx_k", k),
                ("ctx_v", v),
            ):
                d[name].host[:, i] = source.host[:, 0]
            state = min(s.chunks_committed, self._last_state)
            for name in graph_io.STATE_TABLES:
                d[name].host[i] = self._states[state][name].host
            mix[i] = self._mixes[state].host
            if s.vae_started:
                current = s.vae[s.vae_cur]
                for name in self._vae_cache_names():
                    vae[name].host[i] = current[name].host[0]
            if i < n:
                s.row_x0 = group.x0_rows[i]
        group.x_cur = group.vae_cur = 0
        return group

    def release(self, rows) -> None:
        if not isinstance(rows, _Group):
            return
        for state in rows.states:
            state.device.row_x0 = None
        rows.states = None
        with self._batch_lock:
            self._groups[rows.size].append(rows)

    @staticmethod
    def _check_rows(values, expect, what: str) -> None:
        if len(values) > len(expect) or any(v is not e for v, e in zip(values, expect)):
            raise InputError(f"{what} must be the rows returned by the previous batched call of this chunk")

    def denoise_rows(self, rows, xs, step, eps):
        if not isinstance(rows, _Group):
            return super().denoise_rows(rows, xs, step, eps)
        g, n = rows, len(rows.states)
        if step == 0:  # the chunk's host noise: each row's, padding rows copy row 0's
            g.x_cur = 0
            for i in range(g.size):
                write_host(g.x_rows[0][i], xs[i if i < n else 0])
        else:
            self._check_rows(xs, g.x_rows[g.x_cur], "x")
        if eps[0] is not None:
            for i in range(g.size):
                write_host(g.eps_rows[i], eps[i if i < n else 0])
        b, cur = g.dit, g.x_cur
        b.update({"x": g.x[cur], "x_next": g.x[1 - cur], "x0": g.x0, **self._steps[step]})
        b.runner.run(b)
        g.x_cur = 1 - cur
        if step + 1 == len(self.schedule.t):
            return list(g.x0_rows[:n]), [None] * n
        return list(g.x0_rows[:n]), list(g.x_rows[g.x_cur][:n])

    def store_rows(self, rows, slots, x0s) -> None:
        if not isinstance(rows, _Group):
            return super().store_rows(rows, slots, x0s)
        self._check_rows(x0s, rows.x0_rows, "x0")
        for state, slot, x0 in zip(rows.states, slots, x0s):
            np.copyto(state.device.latents[slot].host, x0.host)

    def cache_pass_rows(self, rows, x0s) -> None:
        if not isinstance(rows, _Group):
            return super().cache_pass_rows(rows, x0s)
        g = rows
        self._check_rows(x0s, g.x0_rows, "x0")
        b = g.dit
        # rerun at context_t on the clean latents (kept for the decode): the outputs go to the x buffers
        b.update({"x": g.x0, "x0": g.x[0], "x_next": g.x[1], **self._steps[-1]})
        b.runner.run(b)
        b.update({"x": g.x[0], "x0": g.x0, "x_next": g.x[1]})
        u = g.update
        u.runner.run(u)  # commit every row: evict, fold into the sink, write the chunk
        for i, state in enumerate(g.states):
            s: _Stream = state.device
            k, v = s.kv[1 - s.kv_cur]
            k.host[:, 0] = u["ctx_k_out"].host[:, i]
            v.host[:, 0] = u["ctx_v_out"].host[:, i]
            s.kv_cur = 1 - s.kv_cur
            s.chunks_committed += 1

    def decode_rows(self, rows, x0s) -> list[np.ndarray]:
        if not isinstance(rows, _Group):
            return super().decode_rows(rows, x0s)
        g = rows
        self._check_rows(x0s, g.x0_rows, "x0")
        runners = self._batch_runners(g.size)
        first_r, step_r = runners[VAE_DECODE_FIRST], runners[VAE_DECODE]
        started = [state.device.vae_started for state in g.states]
        t_first = first_r.graph.tensors["frames"].shape[2]
        t_step, h, w = step_r.graph.tensors["frames"].shape[2:]
        f = g.x0.shape[1]
        outs = [
            np.empty((f * t_step if on else t_first + (f - 1) * t_step, h, w, 3), np.uint8) for on in started
        ]
        done = [0] * len(outs)
        names = self._vae_cache_names()
        z = g.vae_first["z"].host
        for i in range(f):
            np.copyto(z, g.x0.host[:, i : i + 1].transpose(0, 2, 1, 3, 4))  # latent frame i of every row
            calls = []  # (binding, which rows take its frames)
            if i > 0 or any(started):  # rows past their first latent frame: the step graph, one call
                b = g.vae[g.vae_cur]
                step_r.run(b)
                g.vae_cur = 1 - g.vae_cur
                calls.append((b, [True] * len(outs) if i > 0 else started))
            if i == 0 and not all(started):  # rows at the stream's first latent frame: the first graph
                first_r.run(g.vae_first)
                calls.append((g.vae_first, [not on for on in started]))
            current = g.vae[g.vae_cur]  # the cache copy the next call reads
            for b, which in calls:
                pixels = b["frames"].host
                t = pixels.shape[2]
                for row in (r for r, take in enumerate(which) if take):
                    to_uint8_frames(pixels[row], outs[row][done[row] : done[row] + t], g.scratch[:, :t])
                    done[row] += t
                    if b is g.vae_first:
                        for name in names:
                            current[name].host[row] = b[f"{name}_out"].host[row]
        current = g.vae[g.vae_cur]
        for row, state in enumerate(g.states):
            s: _Stream = state.device
            if not s.vae_started:
                s.vae_started, s.vae_cur = True, 0
            for name in names:
                s.vae[s.vae_cur][name].host[0] = current[name].host[row]
        return outs

    # ---- prompt switch, snapshots ---------------------------------------------------------------

    def all_finite(self, x) -> bool:
        host = self.runners[DIT_STEP].read(x) if isinstance(x, Buffer) else np.asarray(x)
        return bool(np.isfinite(host).all())

    def store_latents(self, state, slot, x0) -> None:
        """Copy the chunk's clean latents into ring slot ``slot`` before the next chunk's steps overwrite x0."""
        s: _Stream = state.device
        if x0 is s.x0:
            self._copy(s.x0, s.latents[slot])
        elif isinstance(x0, Buffer):
            raise InputError("store_latents() takes the x0 returned by this stream's last denoising step")
        else:
            self.runners[DIT_STEP].write(s.latents[slot], x0)

    def stored_latents(self, state, slot) -> Buffer:
        return state.device.latents[slot]

    def set_cache_fill(self, state, chunks_committed) -> None:
        state.device.chunks_committed = chunks_committed

    def _copy(self, src: Buffer, dst: Buffer) -> None:
        """Buffer to buffer: in place for host buffers (no allocation); device buffers go through the host."""
        if src.host is not None and dst.host is not None:
            np.copyto(dst.host, src.host)
        else:
            runner = self.runners[DIT_STEP]
            runner.write(dst, runner.read(src))

    def export_state(self, state) -> StateArrays:
        """Host float32 copies of the buffers the stream currently reads (the current ping-pong copies)."""
        s: _Stream = state.device
        read = self.runners[DIT_STEP].read

        def host(buffer):
            return np.array(read(buffer), dtype=np.float32, copy=True)

        k, v = s.kv[s.kv_cur]
        vae = s.vae[s.vae_cur]
        return StateArrays(
            cache_k=host(k),
            cache_v=host(v),
            text_k=host(s.dit["text_k"]),
            text_v=host(s.dit["text_v"]),
            latents=np.stack([host(b) for b in s.latents]),
            vae_cache=tuple(host(vae[n]) for n in self._vae_cache_names()) if s.vae_started else (),
            chunks_committed=s.chunks_committed,
        )

    def import_state(self, arrays: StateArrays, latent_frames_decoded: int) -> StreamState:
        """A new stream (its own buffers) holding copies of ``arrays``, current copies 0."""
        dit, step = self.runners[DIT_STEP], self.runners[VAE_DECODE]
        text = []
        for name, array in (("text_k", arrays.text_k), ("text_v", arrays.text_v)):
            text.append(dit.allocate(array.shape, _dtype(dit, name)))
            dit.write(text[-1], array)
        state = self.new_stream(tuple(text))
        s: _Stream = state.device
        for buffer, array in (
            (s.kv[0][0], arrays.cache_k),
            (s.kv[0][1], arrays.cache_v),
            *zip(s.latents, arrays.latents),
        ):
            dit.write(buffer, array)
        if latent_frames_decoded:
            for name, array in zip(self._vae_cache_names(), arrays.vae_cache):
                step.write(s.vae[0][name], array)
            s.vae_started = True
        s.chunks_committed = arrays.chunks_committed
        return state

    def state_shapes(self) -> dict:
        step = self.runners[VAE_DECODE].graph.tensors
        return {
            "kv": self._kv_shape,
            TEXT_KV: self.runners[DIT_STEP].graph.tensors["text_k"].shape,
            "latents": (self.info.context_chunks, *self.info.chunk_latent_shape),
            "vae_cache": [step[n].shape for n in self._vae_cache_names()],
        }

    def describe(self) -> dict:
        out = {
            "backend": self.name,
            "device": self.device,
            "precision": _dtype(self.runners[DIT_STEP], "ctx_k"),
            "graphs": {g: r.name for g, r in self.runners.items()},
            "overlap": self.overlap,
        }
        threads = {g: r.threads for g, r in self.runners.items() if getattr(r, "threads", None) is not None}
        if threads:
            out["cpu_threads"] = {
                g: {"intra_op": t.intra_op, "spinning": t.spinning} for g, t in threads.items()
            }
        return out


def _warn_if_too_large(bundle: Bundle, backend: str, device: str) -> None:
    """Before any session or engine loads: ``rf-bench --estimate``'s memory for one stream against the
    device's free memory. A warning, not a refusal: the estimate's activations are an upper bound."""
    from rf_runtime import memory

    precision = "fp32"
    if backend == "tensorrt":
        plan = plan_names(bundle).get(DIT_STEP)
        if plan is None:
            return  # _make_runners names what is missing
        precision = bundle.manifest["graphs"].get(plan, {}).get("precision", "fp32")
    row = memory.estimate(bundle, backend, precision)
    if row is None:
        return
    try:
        free, source = memory.device_memory(device)
    except RFError:
        return
    if row.total > free:
        logger.warning(
            "bundle %s needs about %s for one stream on %s %s (rf-bench --estimate %s), and %s has %s "
            "free (%s): the load or the first chunk may fail for lack of memory",
            bundle.path,
            memory.size(row.total),
            backend,
            precision,
            bundle.path,
            device,
            memory.size(free),
            source,
        )


def _batched_shape(graph: str, tensor: str, shape: tuple, size: int) -> tuple:
    """The shape of a per-chunk graph's tensor with ``size`` rows (``graph_io.BATCHED_GRAPHS``)."""
    if tensor in ("t_freq", "sigma", "sigma_next", "cos_ctx", "sin_ctx"):
        return shape  # shared by the rows
    if tensor in graph_io.STATE_TABLES or tensor == "mix":
        return (size, *shape)  # one table per row
    if graph == DIT_STEP and tensor in ("text_k", "text_v", "ctx_k", "ctx_v", "new_k", "new_v"):
        return (shape[0], size, *shape[2:])  # [L, B, ...]
    if graph == CACHE_UPDATE:
        return (shape[0], size, *shape[2:])
    return (size, *shape[1:])


def _activate(runner: Runner, graph: str, bundle: str) -> None:
    """Load one graph (an onnxruntime session, a TensorRT engine). A file the framework cannot load is the
    bundle's fault: a BundleError naming the graph, never the framework's traceback; RFErrors pass as they are."""
    try:
        runner.activate()
    except RFError:
        raise
    except (
        Exception
    ) as exc:  # onnxruntime and TensorRT raise their own types (Fail, InvalidGraph, RuntimeError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(
            f"graph {graph!r} of bundle {bundle} cannot be loaded ({type(exc).__name__}: {reason}); "
            "rebuild it with `rf-export onnx --model-dir MODEL_DIR --out BUNDLE`"
        ) from exc


def _dtype(runner: Runner, name: str) -> str:
    return runner.graph.tensors[name].dtype
