"""``Streamer``: iterate the frames of an unbounded text-to-video stream as they are made.

    streamer = Streamer.load("engines/procedural-world-64")  # an engine bundle or a model folder
    for frames in streamer.stream("a red fox running through snow", seed=0):
        ...  # uint8 [T, H, W, 3]: 9 frames for the first chunk, 12 after, at 16 fps

    stream = streamer.open("a red fox running through snow", seed=0)   # a Stream: its own state
    for chunk in stream:                                  # Chunk: frames + timing
        ...
        stream.set_prompt("the fox jumps into a river")   # LongLive re-cache: no cut
        snapshot = stream.save_state()                    # resume with streamer.resume(snapshot)

Work happens as the caller iterates. The noise comes from numpy's PCG64 seeded by ``seed``, in a
fixed order (``sampler.chunk_noise``), so the same seed gives the same video on every backend.
The streamer never branches on the backend: it runs the chunk loop over the ``Backend`` interface.
Where the backend declares it (``Backend.overlap``: onnxruntime CPU with >= 2 cores, by default), a
chunk's decode runs in a second thread beside the next chunk's denoising; the frames are the same bits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from rf_runtime.backends.base import Backend, ModelInfo, choose_overlap
from rf_runtime.errors import InputError, StreamError
from rf_runtime.schema import as_int
from rf_runtime.sampler import StreamSettings, chunk_noise
from rf_runtime.snapshot import SnapshotError, StreamSnapshot, geometry_difference

logger = logging.getLogger("rf_runtime")


@dataclass(frozen=True)
class Chunk:
    """One generated chunk."""

    index: int  # 0, 1, 2, ...
    start_frame: int  # index of its first video frame in the stream
    frames: np.ndarray  # uint8 [T, H, W, 3]
    # Timing. Serially: seconds = denoise_seconds + decode_seconds. With the decode overlapped
    # (``Backend.overlap``) the parts ran at once, partly in the call before, so seconds is less:
    seconds: float  # wall time of the call that handed it out (with overlap: also the next chunk's steps)
    denoise_seconds: float = 0.0  # its own noise drawing, denoising steps, guard and clean-context cache
    # pass, device synchronised (with overlap: its steps ran in the call before this one)
    decode_seconds: float = 0.0  # its VAE decode, until the frames are on the host (with overlap: in the
    # decode thread, beside the calling thread's work)
    guard_seconds: float = 0.0  # the numeric guard: the check that the chunk's latents are finite


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError("the prompt is empty: describe the video to generate, e.g. 'a red circle bouncing'")
    return prompt


class Streamer:
    """Streams video for a prompt through one backend.

    Build it with ``load`` (an engine bundle or a model folder, whichever the path is), or the two
    factories it calls: ``from_engine`` (a bundle, no torch) and ``from_checkpoint`` (a model folder,
    the PyTorch reference models); or pass any ``Backend``.
    """

    def __init__(self, backend: Backend, source: str | None = None):
        self.backend = backend
        self.source = source  # "engine bundle", "model folder", or None for a backend passed in

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        *,
        backend: str = "auto",
        device: str = "cpu",
        threads=None,
        overlap: bool | None = None,
        **options,
    ) -> "Streamer":
        """Load what ``path`` is: an engine bundle (``manifest.json``) or a model folder (``config.json``).

        path: None loads the bundle that ships with rf_runtime (``engines/procedural-world-64``).
        checkpoint, options (``settings``, ``height``, ``width``, ``dtype``, ``use_ema``, ``vae_path``,
            ``text_encoder``): for a model folder (``from_checkpoint``); a bundle has them fixed and
            refuses them with the reason.
        backend: "auto", or for a bundle "onnxruntime" / "tensorrt" (``from_engine``), for a model
            folder "torch".
        threads: a bundle's onnxruntime CPU threading (``from_engine``); a model folder refuses it.
        overlap: decode chunk n beside chunk n+1's denoising (``from_engine``); None chooses.
        ``source`` of the result says which was found ("engine bundle" or "model folder"); it is logged too.
        """
        from rf_runtime import model_dir
        from rf_runtime.bundle import MANIFEST, default_engine_dir

        if path is None:
            path = default_engine_dir()
        where = os.fspath(path)
        if os.path.isfile(os.path.join(where, MANIFEST)):
            given = sorted(options) + (["checkpoint"] if checkpoint is not None else [])
            if given:
                raise InputError(
                    f"{where} is an engine bundle: its size, precision and cache are fixed at export, "
                    f"so {', '.join(given)} do not apply; pass a model folder to change them"
                )
            logger.info("loading the engine bundle %s", where)
            return cls.from_engine(where, backend=backend, device=device, threads=threads, overlap=overlap)
        if model_dir.is_model_dir(where):
            if backend not in ("auto", "torch"):
                raise InputError(
                    f"{where} is a model folder, run by the PyTorch backend: backend={backend!r} needs "
                    "an engine bundle (rf-export onnx --model-dir DIR --out BUNDLE makes one)"
                )
            if threads is not None:
                raise InputError(
                    f"{where} is a model folder, run by PyTorch: threads= sets onnxruntime's threads of "
                    "an engine bundle; for PyTorch use torch.set_num_threads"
                )
            logger.info("loading the model folder %s with PyTorch", where)
            return cls.from_checkpoint(where, checkpoint, device=device, overlap=overlap, **options)
        what = (
            "does not exist" if not os.path.exists(where) else "holds neither manifest.json nor config.json"
        )
        raise InputError(
            f"{where} {what}: pass an engine bundle (a folder with {MANIFEST}, from rf-export onnx) "
            f"or a model folder (a folder with {model_dir.CONFIG} and the weights)"
        )

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def settings(self) -> StreamSettings:
        return self.backend.info.settings

    @property
    def fps(self) -> int:
        return self.backend.info.fps

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        *,
        vae_path: str | os.PathLike | None = None,
        text_encoder=None,
        settings: StreamSettings | None = None,
        height: int | None = None,
        width: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        use_ema: bool = True,
        static: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        overlap: bool | None = None,
    ) -> "Streamer":
        """Load the PyTorch reference models from a Wan2.1-style directory.

        model_dir: holds ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (the DiT),
            ``Wan2.1_VAE.pth`` (or ``vae.safetensors``) and the text encoder (umT5 ``.pth`` +
            ``google/umt5-xxl/`` tokenizer); an optional ``rf_runtime.json`` carries the VAE config,
            stream settings and resolution of models trained with this project.
        checkpoint: a generator checkpoint to load on top (``rewardforcing.pt`` or a training
            checkpoint); ``use_ema`` picks ``generator_ema`` over ``generator`` in the latter.
        text_encoder: a ``TextEncoder`` object to use instead of the one in ``model_dir``.
        static: the fast path (``rf_runtime.backends.pytorch_static``): buffers allocated once per stream, every call
            on static shapes; with it, ``cuda_graphs`` (default: on for a CUDA device) captures and replays
            CUDA graphs and ``compile`` wraps the DiT and VAE steps in ``torch.compile``.
        overlap: None or False; the PyTorch backends decode serially (``TorchBackend``), so True is a
            ConfigError.
        """
        choose_overlap(overlap, supported=False, threads_given=False, cores=1, backend="torch")
        from rf_runtime.backends.pytorch import TorchBackend

        options = dict(
            vae_path=vae_path,
            text_encoder=text_encoder,
            settings=settings,
            height=height,
            width=width,
            device=device,
            dtype=dtype,
            use_ema=use_ema,
        )
        if static:
            from rf_runtime.backends.pytorch_static import StaticTorchBackend

            return cls(
                StaticTorchBackend.from_dir(
                    model_dir, checkpoint, cuda_graphs=cuda_graphs, compile=compile, **options
                ),
                "model folder",
            )
        if cuda_graphs or compile:
            raise InputError("cuda_graphs and compile belong to the static path: pass static=True")
        return cls(TorchBackend.from_dir(model_dir, checkpoint, **options), "model folder")

    @classmethod
    def from_engine(
        cls,
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        device: str = "cpu",
        *,
        threads=None,
        ema_alpha: float | None = None,
        overlap: bool | None = None,
    ) -> "Streamer":
        """Stream from an engine bundle (``rf_runtime.bundle``); no torch needed.

        path: the bundle directory; None: the default model shipped with the package
            (``bundle.default_engine_dir()``).
        backend: "onnxruntime", "tensorrt", or "auto" (TensorRT when the bundle has plans for this
            GPU and tensorrt + cuda-python are installed, else onnxruntime). An explicit backend
            that cannot run here is an error, never a silent fallback.
        device: "cpu" or "cuda". The bundle's model card is checked against its stream settings.
        threads: onnxruntime CPU threading, a ``rf_runtime.runners.onnxruntime_runner.CpuThreads`` or
            an int (intra-op threads of every session); None chooses from the machine
            (``rf_runtime.backends.engine.cpu_threads``). Give 1 when several streams run at once.
        ema_alpha: the EMA-Sink rate in [0, 1] instead of the bundle's (1 keeps the sink static); the
            cache's sizes are the graphs' and cannot change.
        overlap: decode chunk n in a second thread while chunk n+1 denoises (the frames are the same
            bits; docs/notes/speed.md). None: on for onnxruntime CPU with >= 2 usable cores and
            ``threads`` not given (the VAE sessions then get the cores but one, the DiT one thread);
            False when several streams run at once on the cores; True forces it (ConfigError where the
            backend cannot).
        """
        from rf_runtime.backends.engine import EngineBackend
        from rf_runtime.bundle import default_engine_dir

        return cls(
            EngineBackend.load(
                default_engine_dir() if path is None else path,
                backend=backend,
                device=device,
                threads=threads,
                ema_alpha=ema_alpha,
                overlap=overlap,
            ),
            "engine bundle",
        )

    # ---- streaming ---------------------------------------------------------------------------

    def open(self, prompt: str, *, seed: int = 0, num_frames: int | None = None) -> "Stream":
        """A ``Stream``: iterate it for ``Chunk`` objects; switch its prompt or save its state between chunks.

        Each stream has its own state; several streams of one Streamer can be interleaved freely.
        """
        check_prompt(prompt)
        num_frames = as_int(
            num_frames, "num_frames", minimum=1, none_ok=True, hint="None streams without end"
        )
        seed = as_int(seed, "seed", minimum=0)
        if self.backend.model_card is not None:
            self.backend.model_card.check_length(num_frames)
            self.backend.model_card.check_prompt(prompt)
        return Stream(self, prompt, int(seed), num_frames)

    def resume(self, snapshot: StreamSnapshot) -> "Stream":
        """A ``Stream`` that goes on from ``snapshot`` (``Stream.save_state``) exactly where it stopped.

        The snapshot must come from a model of the same geometry (sizes, cache, resolution); the frames
        then equal those of the uninterrupted stream bit for bit on the same backend.
        """
        if not isinstance(snapshot, StreamSnapshot):
            raise InputError(
                f"resume takes a StreamSnapshot (from Stream.save_state or StreamSnapshot.load), "
                f"got {type(snapshot).__name__}"
            )
        diff = geometry_difference(snapshot.geometry, self.backend.geometry())
        if diff:
            raise SnapshotError(
                "this snapshot was made by a model of another geometry and cannot be resumed on this "
                "one (" + "; ".join(diff) + "): resume it on the model that made it"
            )
        snapshot.check_shapes()
        if self.backend.model_card is not None:
            self.backend.model_card.check_length(snapshot.num_frames)
        return Stream(self, snapshot.prompt, snapshot.seed, snapshot.num_frames, snapshot=snapshot)

    def stream_chunks(self, prompt: str, *, seed: int = 0, num_frames: int | None = None) -> Iterator[Chunk]:
        """Yield ``Chunk`` objects as they are generated; forever when ``num_frames`` is None."""
        return self.open(prompt, seed=seed, num_frames=num_frames)

    def stream(self, prompt: str, *, seed: int = 0, num_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield each chunk's decoded frames, uint8 [T, H, W, 3], as soon as the chunk is done.

        9 frames for the first chunk and 12 after (3 latent frames per chunk); with ``num_frames``
        the stream stops after exactly that many frames, without it it runs forever.
        """
        return (chunk.frames for chunk in self.stream_chunks(prompt, seed=seed, num_frames=num_frames))


class _DecodeThread:
    """The thread that decodes a stream's chunks beside its denoising (``Backend.overlap``).

    One job at a time, handed over through two locks, so that a chunk allocates nothing for it
    (``concurrent.futures`` makes a Future, its condition and a work item per call, ~2.6 KB):
    ``start(fn, *args)``, then ``wait()`` returns its result or raises its exception in the caller's
    thread. ``stop()`` ends the thread (idle: at once)."""

    def __init__(self):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._job = self._result = self._error = None
        self._stopped = self._pending = False
        self.thread = threading.Thread(target=self._loop, name="rf-decode", daemon=True)
        self.thread.start()

    def start(self, fn, *args) -> None:
        self._job, self._pending = (fn, args), True
        self._go.release()

    def busy(self) -> bool:
        """True from ``start`` until its ``wait`` returned."""
        return self._pending

    def wait(self):
        self._done.acquire()
        self._pending = False
        result, error = self._result, self._error
        self._result = self._error = None
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._job = None
            self._go.release()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            if job is None:
                return
            try:
                self._result = job[0](*job[1])
            except BaseException as exc:  # raised again by wait(), in the caller's thread
                self._error = exc
            job = None  # hold nothing of the stream while idle
            self._done.release()


@dataclass(slots=True)
class _Ahead:
    """Chunk n+1, denoised in the calling thread while chunk n decoded (``Backend.overlap``)."""

    x0: Any  # its clean latents (the backend's x0)
    rng_state: dict  # the RNG before its noise was drawn: what a snapshot records, what a discard restores
    seconds: float  # its noise drawing, steps and guard
    guard_seconds: float
    finite: bool
    stale: bool = False  # the stream's text and cache changed since (a prompt switch): re-run its steps


class Stream:
    """One stream: an iterator of ``Chunk`` objects with its own KV cache, text, VAE cache and RNG.

        stream = streamer.open("a red fox running through snow", seed=0)
        for chunk in stream:
            show(chunk.frames)
            if user_typed_something:
                stream.set_prompt("the fox jumps into a river")   # the scene changes without a cut
            if pausing:
                stream.save_state().save("fox.npz")                # resume later with streamer.resume(...)

    Work happens as the caller iterates; ``set_prompt`` and ``save_state`` act between chunks.

    With ``Backend.overlap`` a chunk's call decodes chunk n in the stream's decode thread while the
    calling thread runs chunk n's cache pass and then the denoising steps of chunk n+1 ("ahead"); the
    call returns once the decode is done, so nothing runs between calls. The ahead chunk is only
    latents: a prompt switch re-runs its steps on the same noise, a snapshot records the RNG from
    before its noise was drawn, and the frames are the same bits as with the serial loop.
    """

    def __init__(
        self,
        streamer: Streamer,
        prompt: str,
        seed: int,
        num_frames: int | None,
        *,
        snapshot: StreamSnapshot | None = None,
    ):
        self._backend = be = streamer.backend
        self.info = be.info
        self.seed, self.num_frames = seed, num_frames
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._noise_shape = (1, self.info.latent_channels, *self.info.latent_hw)
        self._noise = None  # the chunk's noise arrays, drawn into in place from the second chunk on
        self._overlap = bool(be.overlap and be.supports_overlap)
        self._ahead: _Ahead | None = None
        self._decoder: _DecodeThread | None = None  # the decode thread, started by the first chunk
        self._stop_thread = None  # its weakref.finalize: stops it when the stream is closed or collected
        self._lock = threading.Lock()  # guards _busy and the decode thread's shutdown
        self._busy = False  # a chunk is being made (close() from another thread waits for its end)
        if snapshot is None:
            self.prompt = prompt
            self.prompt_history: list[tuple[int, str]] = [(0, prompt)]
            self.chunk_index = 0  # chunks made so far
            self.frames_emitted = 0
            self._state = be.new_stream(be.encode_prompt(prompt))
        else:
            self.prompt = snapshot.prompt
            self.prompt_history = list(snapshot.prompt_history)
            self.chunk_index, self.frames_emitted = snapshot.chunk_index, snapshot.frames_emitted
            self._rng.bit_generator.state = snapshot.rng_state
            frames_decoded = snapshot.chunk_index * self.info.settings.chunk_frames
            self._state = be.import_state(snapshot.state, latent_frames_decoded=frames_decoded)

    @property
    def closed(self) -> bool:
        """True once ``close`` was called (its buffers are released)."""
        return self._state is None

    @property
    def finished(self) -> bool:
        """True once ``num_frames`` frames have been handed out (never for an unbounded stream)."""
        return self.num_frames is not None and self.frames_emitted >= self.num_frames

    @property
    def overlap(self) -> bool:
        """True when this stream decodes each chunk beside the next chunk's denoising."""
        return self._overlap

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Chunk:
        if self.finished or self._state is None:
            raise StopIteration
        with self._lock:
            self._busy = True
        try:
            return self._next_chunk()
        finally:
            with self._lock:
                self._busy = False
                if self._state is None:  # closed from another thread meanwhile
                    self._stop_decoder()

    def close(self) -> None:
        """Release the stream's buffers and its decode thread; iterating it afterwards stops at once."""
        self._state = None
        self._ahead = None
        with self._lock:
            if not self._busy:
                self._stop_decoder()

    def _stop_decoder(self) -> None:
        if self._stop_thread is not None:
            self._stop_thread()  # idle between chunks: its thread ends at once
            self._decoder = self._stop_thread = None

    def _decode_thread(self) -> _DecodeThread:
        if self._decoder is None:
            self._decoder = _DecodeThread()
            # a stream dropped without close(): its thread ends when the stream is collected
            self._stop_thread = weakref.finalize(self, self._decoder.stop)
        return self._decoder

    def _draw_noise(self) -> tuple:
        """The chunk's noise (initial latents, fresh noise per step), drawn into the stream's arrays."""
        self._noise = chunk_noise(self._rng, self.info.settings, self._noise_shape, self._noise)
        return self._noise

    def _discard_ahead(self) -> None:
        """Forget the ahead chunk, as if its noise had never been drawn (for a caller that makes the next
        chunk another way: ``rf_runtime.batching``)."""
        if self._ahead is not None:
            self._rng.bit_generator.state = self._ahead.rng_state
            self._ahead = None

    def _nonfinite(self) -> StreamError:
        return StreamError(
            f"chunk {self.chunk_index} of the stream has non-finite latents (NaN or Inf): the "
            "model's weights or the stream's state are damaged; check the model (`rf-export "
            "verify BUNDLE --model-dir DIR`), or resume from a snapshot saved before this chunk"
        )

    def _emit(self, frames: np.ndarray, seconds: float, denoise: float, decode: float, guard: float) -> Chunk:
        """The chunk of ``frames`` (cut at ``num_frames``), counted."""
        if self.num_frames is not None:
            frames = frames[: self.num_frames - self.frames_emitted]
        chunk = Chunk(
            self.chunk_index,
            self.frames_emitted,
            frames,
            seconds,
            denoise_seconds=denoise,
            decode_seconds=decode,
            guard_seconds=guard,
        )
        self.chunk_index += 1
        self.frames_emitted += len(frames)
        logger.debug("chunk %d: %d frames in %.3f s", chunk.index, len(frames), chunk.seconds)
        return chunk

    def _denoise(self, state, draw: bool) -> tuple[Any, float, float, bool]:
        """The denoising steps of one chunk of ``state`` (the stream's, taken when its call began: a
        ``close`` from another thread meanwhile clears ``self._state``) on its noise (drawn first when
        ``draw``, else the noise drawn last, again), then the numeric guard: (x0, seconds, guard
        seconds, finite)."""
        be, settings = self._backend, self.info.settings
        start = time.perf_counter()
        init, fresh = self._draw_noise() if draw else self._noise
        x = be.upload(init)
        for k in range(settings.num_steps):
            eps = be.upload(fresh[k]) if k + 1 < settings.num_steps else None
            x0, x = be.denoise_step(state, x, k, eps)
        guard = time.perf_counter()
        finite = be.all_finite(x0)  # the numeric guard: NaN / Inf latents would decode to black or noise
        end = time.perf_counter()
        return x0, end - start, end - guard, finite

    def _wants_next(self) -> bool:
        """Whether a chunk after the current one will be handed out (``num_frames`` not reached by it)."""
        made = self.frames_emitted + self.info.frames_of_chunk(self.chunk_index)
        return self.num_frames is None or made < self.num_frames

    @staticmethod
    def _timed_decode(be: Backend, state, x0) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        frames = be.decode(state, x0)
        return frames, time.perf_counter() - start

    def _next_chunk(self) -> Chunk:
        be, state = self._backend, self._state
        start = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead.stale:
            x0, steps, guard, finite = ahead.x0, ahead.seconds, ahead.guard_seconds, ahead.finite
        else:  # a stale ahead chunk: its noise again, not new noise
            x0, steps, guard, finite = self._denoise(state, draw=ahead is None)
        if not finite:
            raise self._nonfinite()
        # keep the clean latents of the last chunks: a prompt switch re-caches them, an overlapped decode reads them
        slot = self.chunk_index % self.info.context_chunks
        cached = time.perf_counter()
        be.store_latents(state, slot, x0)
        if not self._overlap:
            # rerun with timestep zero to update the KV cache using clean context
            be.cache_pass(state, x0)
            be.synchronize()
            denoised = time.perf_counter()
            frames = be.decode(state, x0)
            end = time.perf_counter()
            return self._emit(frames, end - start, steps + denoised - cached, end - denoised, guard)
        decoder = self._decode_thread()
        decoder.start(self._timed_decode, be, state, be.stored_latents(state, slot))
        before = None  # the RNG before chunk n+1's noise
        try:
            be.cache_pass(state, x0)
            be.synchronize()
            denoised = time.perf_counter()
            # chunk n+1's steps, on the cache chunk n was just committed to (not once the stream is closed)
            if self._wants_next() and self._state is not None:
                before = self._rng.bit_generator.state
                x0, seconds, guard_next, finite = self._denoise(state, draw=True)
                self._ahead = _Ahead(x0, before, seconds, guard_next, finite)
            frames, decode = decoder.wait()
            if self._state is None:  # closed from another thread during the call: keep nothing ahead
                self._ahead = None
        except BaseException:
            if decoder.busy():
                try:  # wait for the decode: nothing may run once the call returns
                    decoder.wait()
                except BaseException:
                    pass  # the first error is the one raised
            # leave the stream as the serial loop leaves a failed chunk: its noise drawn, no more
            self._ahead = None
            if before is not None:
                self._rng.bit_generator.state = before
            raise
        end = time.perf_counter()
        return self._emit(frames, end - start, steps + denoised - cached, decode, guard)

    # ---- prompt switch ---------------------------------------------------------------------------

    def set_prompt(self, prompt: str, *, keep_sink: bool = False) -> None:
        """Switch the prompt before the next chunk, re-caching the context with the new text (LongLive).

        The clean latents of the chunks in the cache's reach are re-run at t = context_t with the new
        text, chunk by chunk, oldest first, each attending to the re-run chunks before it and to itself
        (LongLive's block-causal re-cache), and their keys/values replace the cache. By default the sink
        is re-cached too (LongLive's interactive setting, ``global_sink: false``): the oldest re-run
        chunk becomes the sink, so the old prompt leaves the cache entirely. ``keep_sink=True``
        (LongLive's ``global_sink: true``) keeps the sink's keys/values (the first chunk folded with
        the EMA of evicted ones) and re-caches only the window.
        """
        check_prompt(prompt)
        if self._state is None:
            raise InputError("this stream is closed: open a new one with Streamer.open")
        be, state = self._backend, self._state
        be.set_text(state, be.encode_prompt(prompt))
        if self._ahead is not None:  # denoised on the old text and cache: re-run on its noise
            self._ahead.stale = True
        self.prompt = prompt
        self.prompt_history.append((self.chunk_index, prompt))
        fill, rerun = recache_plan(self.info.settings, self.chunk_index, keep_sink)
        if not rerun:
            return
        be.set_cache_fill(state, fill)
        for index in rerun:
            be.cache_pass(state, be.stored_latents(state, index % self.info.context_chunks))
        logger.debug("prompt switch at chunk %d: re-cached chunks %s", self.chunk_index, list(rerun))

    # ---- snapshots -------------------------------------------------------------------------------

    def save_state(self) -> StreamSnapshot:
        """Host copies of everything needed to continue this stream exactly (``Streamer.resume``)."""
        if self._state is None:
            raise InputError("this stream is closed: save its state before closing it")
        be = self._backend
        # an ahead chunk is not part of the state: the RNG as before its noise was drawn
        rng = self._ahead.rng_state if self._ahead is not None else self._rng.bit_generator.state
        return StreamSnapshot(
            prompt=self.prompt,
            prompt_history=tuple(self.prompt_history),
            seed=self.seed,
            rng_state=rng,
            chunk_index=self.chunk_index,
            frames_emitted=self.frames_emitted,
            num_frames=self.num_frames,
            geometry=be.geometry(),
            state=be.export_state(self._state),
        )


def recache_plan(settings: StreamSettings, chunks_made: int, keep_sink: bool) -> tuple[int, range]:
    """Which chunks a prompt switch re-runs after ``chunks_made`` chunks, and the cache fill to start from.

    Returns (fill, chunk indices): the cache is declared to hold its first ``fill`` chunks (1: the
    sink alone; 0: nothing), then the chunks are re-run and committed in order.
    """
    spec = settings.cache_spec
    reach = spec.context_frames // spec.chunk_frames  # chunks the full cache holds
    if keep_sink and spec.sink_frames:
        count = min(spec.window_slots, max(chunks_made - 1, 0))
        return 1, range(chunks_made - count, chunks_made)
    count = min(reach, chunks_made)
    return 0, range(chunks_made - count, chunks_made)
