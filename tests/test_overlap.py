"""The decode of chunk n beside the denoising of chunk n+1 (``Backend.overlap``, ``Stream``).

Tolerance: exact. The overlapped stream runs the same graph calls on the same inputs as the serial
one (the VAE reads the ring slot, an exact copy of x0), so its uint8 frames, snapshots and errors are
compared with the serial stream's bit for bit. Both streamers use one-thread sessions, so the only
difference between them is the overlap. Real onnxruntime on the tiny bundle (`engine_dirs`) and the
shipped bundle; that the decode really runs beside the next steps is shown with events, not timing.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from rf_runtime import Streamer  # noqa: E402
from rf_runtime.backends.base import choose_overlap  # noqa: E402
from rf_runtime.backends.engine import EngineBackend  # noqa: E402
from rf_runtime.streamer import Chunk  # noqa: E402
from rf_runtime.bundle import default_engine_dir  # noqa: E402
from rf_runtime.errors import ConfigError, RFError, StreamError  # noqa: E402
from rf_runtime.snapshot import StreamSnapshot  # noqa: E402

A, B, C = "a red circle bouncing", "a blue square spinning slowly", "a green triangle"
CHUNKS = 8  # the tiny model's cache (sink 1 chunk + window) evicts and folds from chunk 3 on


@pytest.fixture(scope="module")
def pair(engine_dirs):
    """(overlapped, serial) streamers of the tiny bundle, one-thread sessions each."""
    bundle = engine_dirs[1]
    on = Streamer.from_engine(bundle, threads=1, overlap=True)
    off = Streamer.from_engine(bundle, threads=1, overlap=False)
    assert on.backend.overlap and not off.backend.overlap
    return on, off


def run(streamer, chunks=CHUNKS, *, seed=3, switches=(), num_frames=None, snapshot_at=None):
    """Frames of each chunk; switches: {chunk index: [(prompt, keep_sink), ...]} applied before it.
    snapshot_at: also return the snapshot saved before that chunk (after its switches)."""
    stream = streamer.open(A, seed=seed, num_frames=num_frames)
    frames, snap = [], None
    for i in range(chunks):
        for prompt, keep in dict(switches).get(i, ()):
            stream.set_prompt(prompt, keep_sink=keep)
        if i == snapshot_at:
            snap = stream.save_state()
        chunk = next(stream, None)
        if chunk is None:
            break
        frames.append(chunk.frames)
    stream.close()
    return (frames, snap) if snapshot_at is not None else frames


def assert_same(got, want):
    assert len(got) == len(want) and len(want) > 0
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def decode_threads():
    return [t for t in threading.enumerate() if t.name == "rf-decode"]


# ---- the same frames ------------------------------------------------------------------------------


def test_overlap_gives_the_serial_frames_past_eviction_and_fold(pair):
    on, off = pair
    want = run(off)
    assert len({f.tobytes() for f in want}) == CHUNKS  # a video that moves: a wrong chunk would show
    assert_same(run(on), want)


@pytest.mark.parametrize("keep_sink", [False, True])
@pytest.mark.parametrize(
    "switches",
    [
        {4: [(B, None)]},  # mid-stream, past the first eviction
        {1: [(B, None)], 5: [(C, None), (B, None)]},  # early, and two switches between two chunks
    ],
    ids=["one", "two"],
)
def test_prompt_switches_give_the_serial_frames(pair, switches, keep_sink):
    """A switch between chunks invalidates the chunk made ahead: its steps re-run on the same noise."""
    on, off = pair
    switches = {i: [(p, keep_sink) for p, _ in s] for i, s in switches.items()}
    want = run(off, switches=switches)
    assert_same(run(on, switches=switches), want)
    assert not all(np.array_equal(a, b) for a, b in zip(want, run(off)))  # the switch changed the video


@pytest.mark.parametrize("saved_by, resumed_by", [("on", "off"), ("off", "on"), ("on", "on")])
@pytest.mark.parametrize("switch", [False, True], ids=["plain", "after-a-switch"])
def test_snapshots_resume_bit_exactly_across_modes(pair, tmp_path, saved_by, resumed_by, switch):
    """A snapshot records the RNG as if the chunk made ahead had not been drawn, so it resumes to the
    serial stream's frames in either mode, and is the serial stream's snapshot, array for array."""
    streamers = dict(zip(("on", "off"), pair))
    k = 4
    switches = {k: [(B, False)]} if switch else {}
    want, serial_snap = run(streamers["off"], switches=switches, snapshot_at=k)
    got, snap = run(streamers[saved_by], switches=switches, snapshot_at=k)
    assert_same(got, want)
    assert snap.rng_state == serial_snap.rng_state and snap.chunk_index == k
    for name in ("cache_k", "cache_v", "text_k", "text_v", "latents"):
        np.testing.assert_array_equal(getattr(snap.state, name), getattr(serial_snap.state, name))
    for a, b in zip(snap.state.vae_cache, serial_snap.state.vae_cache):
        np.testing.assert_array_equal(a, b)
    snap.save(tmp_path / "s.npz")
    stream = streamers[resumed_by].resume(StreamSnapshot.load(tmp_path / "s.npz"))
    assert_same([next(stream).frames for _ in range(CHUNKS - k)], want[k:])


def test_num_frames_cut_and_no_chunk_made_past_the_last(pair, monkeypatch):
    on, off = pair
    n = 9 + 12 * 3 + 5  # 5 chunks, the last cut to 5 frames
    want = run(off, num_frames=n)
    assert [len(f) for f in want] == [9, 12, 12, 12, 5]
    steps = []
    real = on.backend.denoise_step
    monkeypatch.setattr(on.backend, "denoise_step", lambda *a: steps.append(a[2]) or real(*a))
    assert_same(run(on, num_frames=n), want)
    assert len(steps) == 5 * on.settings.num_steps  # 5 chunks denoised, none ahead of the last


# ---- the numeric guard and errors ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 3, 5])
def test_the_guard_stops_at_the_damaged_chunk_in_both_modes(pair, monkeypatch, bad):
    """The KV cache turns NaN in the commit before chunk ``bad`` (as test_batching damages it); with
    overlap that chunk is denoised ahead, in the call of chunk bad-1, and the error comes when it would
    be handed out: the same message and chunk index as serially, the chunks before it the same."""
    results = {}
    for name, streamer in zip(("on", "off"), pair):
        be = streamer.backend
        real, passes = be.cache_pass, []

        def damaging(state, x0, real=real, passes=passes):
            real(state, x0)
            passes.append(1)
            if len(passes) == bad:  # chunk bad-1 was just committed
                s = state.device
                s.kv[s.kv_cur][1].host[...] = np.nan

        monkeypatch.setattr(be, "cache_pass", damaging)
        stream = streamer.open(A, seed=3)
        frames = []
        with pytest.raises(StreamError) as err:
            for _ in range(CHUNKS):
                frames.append(next(stream).frames)
        results[name] = (frames, str(err.value), stream.chunk_index, stream.save_state().rng_state)
        stream.close()
        monkeypatch.undo()
    on, off = results["on"], results["off"]
    assert len(off[0]) == bad and f"chunk {bad} of the stream has non-finite latents" in off[1]
    assert_same(on[0], off[0])
    assert on[1:] == off[1:]


def test_the_guard_at_chunk_0_with_overlap(engine_dirs, tmp_path):
    """A damaged export (a NaN weight in the DiT, as tests/test_faults_stream.py makes it) stops chunk 0."""
    from fault_tools import nan_weight_bundle

    b = nan_weight_bundle(engine_dirs[1], tmp_path / "nan-bundle")
    stream = Streamer.from_engine(b, overlap=True).open(A, seed=0)
    with pytest.raises(StreamError, match=r"chunk 0 of the stream has non-finite latents"):
        next(stream)
    stream.close()


class Boom(RFError):
    pass


def test_a_decode_error_reaches_the_caller_and_nothing_hangs(pair, monkeypatch):
    """A decode that raises in the decode thread raises the same error from next(); the stream's RNG is
    left as the serial loop leaves it (the failed chunk's noise drawn, no more)."""
    states = {}
    for name, streamer in zip(("on", "off"), pair):
        be = streamer.backend
        real, calls = be.decode, []

        def failing(state, x0, real=real, calls=calls):
            calls.append(threading.current_thread().name)
            if len(calls) == 3:
                raise Boom("the VAE failed at chunk 2")
            return real(state, x0)

        monkeypatch.setattr(be, "decode", failing)
        stream = streamer.open(A, seed=3)
        next(stream), next(stream)
        with pytest.raises(Boom, match="the VAE failed at chunk 2"):
            next(stream)
        assert stream.chunk_index == 2
        states[name] = (stream._rng.bit_generator.state, stream.save_state().rng_state)
        if name == "on":
            assert calls == ["rf-decode"] * 3 and not stream._decoder.busy()
        stream.close()
        monkeypatch.undo()
    assert states["on"] == states["off"]
    assert not [t for t in decode_threads() if t.is_alive() and t.join(timeout=10) is None and t.is_alive()]


def test_an_error_in_the_ahead_steps_waits_for_the_decode(pair, monkeypatch):
    on, _ = pair
    be = on.backend
    real_step, real_decode = be.denoise_step, be.decode
    done, calls = threading.Event(), []

    def step(state, x, k, eps):
        calls.append(k)
        if len(calls) == 2 * on.settings.num_steps + 1:  # chunk 2's first step, made ahead in chunk 1's call
            raise Boom("the DiT failed")
        return real_step(state, x, k, eps)

    def decode(state, x0):
        frames = real_decode(state, x0)
        done.set()
        return frames

    monkeypatch.setattr(be, "denoise_step", step)
    monkeypatch.setattr(be, "decode", decode)
    stream = on.open(A, seed=3)
    next(stream)
    done.clear()
    with pytest.raises(Boom, match="the DiT failed"):
        next(stream)
    assert done.is_set() and not stream._decoder.busy()  # chunk 1's decode had finished when it raised
    assert stream.chunk_index == 1 and stream._ahead is None
    stream.close()


# ---- it overlaps, and only where declared -----------------------------------------------------------


def recording(monkeypatch, backend, wait_for_next_steps=False):
    """Wrap the backend's calls to record (call, thread name) in order. wait_for_next_steps: the decode
    of chunk d first waits (up to 30 s) until the first step of chunk d+1 has begun, and records
    whether it had."""
    log, steps_begun, decodes, chunks = [], {}, [0], [0]
    lock = threading.Lock()
    step, cache_pass, decode = backend.denoise_step, backend.cache_pass, backend.decode

    def note(what):
        with lock:
            log.append((what, threading.current_thread().name))

    def begun(chunk) -> threading.Event:
        with lock:
            return steps_begun.setdefault(chunk, threading.Event())

    def denoise_step(state, x, k, eps):
        if k == 0:  # chunk chunks[0] begins
            chunks[0] += 1
            begun(chunks[0] - 1).set()
        note(f"step{k}")
        return step(state, x, k, eps)

    def wrapped_cache_pass(state, x0):
        note("cache_pass")
        return cache_pass(state, x0)

    def wrapped_decode(state, x0):
        chunk, decodes[0] = decodes[0], decodes[0] + 1
        if wait_for_next_steps:
            beside = begun(chunk + 1).wait(timeout=30)
            note("decode-start " + ("beside-steps" if beside else "alone"))
        else:
            note("decode-start")
        frames = decode(state, x0)
        note("decode-end")
        return frames

    monkeypatch.setattr(backend, "denoise_step", denoise_step)
    monkeypatch.setattr(backend, "cache_pass", wrapped_cache_pass)
    monkeypatch.setattr(backend, "decode", wrapped_decode)
    return log


def test_the_decode_runs_in_its_thread_beside_the_next_steps(pair, monkeypatch):
    """The decode of chunk d waits until the first step of chunk d+1 has begun: it can only go on if
    those steps run while it is in flight (serially it would wait the full 30 s and say so)."""
    on, _ = pair
    log = recording(monkeypatch, on.backend, wait_for_next_steps=True)
    stream = on.open(A, seed=3)
    for _ in range(4):
        next(stream)
    stream.close()
    decodes = [(w, t) for w, t in log if w.startswith("decode")]
    assert {t for _, t in decodes} == {"rf-decode"}
    assert [w for w, _ in decodes if w.startswith("decode-start")] == ["decode-start beside-steps"] * 4
    assert {t for w, t in log if not w.startswith("decode")} == {threading.current_thread().name}


def serial_order(log, steps):
    per_chunk = [f"step{k}" for k in range(steps)] + ["cache_pass", "decode-start", "decode-end"]
    return [w for w, _ in log] == per_chunk * (len(log) // len(per_chunk)) and len(log) % len(per_chunk) == 0


def test_a_backend_that_does_not_declare_overlap_is_never_overlapped(pair, engine_dirs, monkeypatch):
    """Serial order and one thread: the engine with overlap off, the torch backend, and a torch backend
    whose ``overlap`` was set without the capability (the streamer asks ``supports_overlap``)."""
    pytest.importorskip("torch")
    torch_streamer = Streamer.from_checkpoint(engine_dirs[0])
    assert not torch_streamer.backend.supports_overlap and not torch_streamer.backend.overlap
    forced = Streamer.from_checkpoint(engine_dirs[0])
    forced.backend.overlap = True
    for streamer in (pair[1], torch_streamer, forced):
        log = recording(monkeypatch, streamer.backend)
        stream = streamer.open(A, seed=3)
        assert not stream.overlap
        for _ in range(3):
            next(stream)
        stream.close()
        assert serial_order(log, streamer.settings.num_steps), log
        assert {t for _, t in log} == {threading.current_thread().name}
        monkeypatch.undo()
    assert not decode_threads()


def test_overlap_true_where_it_cannot_run_is_a_config_error(engine_dirs):
    pytest.importorskip("torch")
    model, bundle = engine_dirs
    for load in (
        lambda: Streamer.from_checkpoint(model, overlap=True),
        lambda: Streamer.load(model, overlap=True),
        lambda: Streamer.from_checkpoint(model, static=True, overlap=True),
        lambda: EngineBackend.load(bundle, backend="onnxruntime", device="cuda", overlap=True),
    ):
        with pytest.raises(ConfigError, match=r"overlap=True: the .* backend cannot decode .* overlap=False"):
            load()
    from rf_runtime.backends.pytorch_static import StaticTorchBackend

    assert StaticTorchBackend.supports_overlap is False
    with pytest.raises(ConfigError, match="overlap must be None"):
        Streamer.from_engine(bundle, overlap="yes")


def test_the_automatic_choice():
    def auto(**kw):
        return choose_overlap(
            None, **{"supported": True, "threads_given": False, "cores": 2, **kw}, backend="x"
        )

    assert auto() and auto(cores=16)
    assert not auto(cores=1)  # nothing to overlap on
    assert not auto(threads_given=True)  # the caller spreads streams over the cores itself
    assert not auto(supported=False)
    common = dict(supported=True, threads_given=True, cores=1, backend="x")
    assert choose_overlap(True, **common) and not choose_overlap(False, **common)  # forced


def test_the_default_on_this_machine(engine_dirs):
    """overlap=None: on with >= 2 usable cores and no threads given; threads given: off."""
    from rf_runtime.runners import onnxruntime_runner

    cores = onnxruntime_runner.usable_cores()
    assert Streamer.from_engine(engine_dirs[1]).backend.overlap is (cores >= 2)
    assert Streamer.from_engine(engine_dirs[1], threads=1).backend.overlap is False


# ---- the decode thread's life ----------------------------------------------------------------------


def test_the_decode_thread_ends_on_close_and_on_collection(pair):
    on, off = pair
    before = set(decode_threads())
    stream = off.open(A)
    next(stream)
    assert set(decode_threads()) == before  # serial: no thread
    stream.close()
    for end in ("close", "collect", "finished"):
        stream = on.open(A, seed=1, num_frames=9 + 12 if end == "finished" else None)
        next(stream)
        (thread,) = set(decode_threads()) - before
        if end == "close":
            stream.close()
        elif end == "collect":
            del stream
            gc.collect()
        else:
            next(stream)
            assert next(stream, None) is None and stream.finished
            stream.close()
        thread.join(timeout=10)
        assert not thread.is_alive(), end


def test_close_from_another_thread_during_a_chunk(pair):
    """close() while a chunk is being made (a server closing a session): the chunk finishes, then the
    decode thread ends; no hang, no error."""
    on, _ = pair
    stream = on.open(A, seed=1)
    next(stream)
    thread = stream._decoder.thread
    be = on.backend
    entered, release = threading.Event(), threading.Event()
    real = be.decode

    def slow_decode(state, x0):
        entered.set()
        release.wait(timeout=30)
        return real(state, x0)

    be.decode = slow_decode
    outcome = []  # what the in-flight call returned or raised, in its thread

    def make_chunk():
        try:
            outcome.append(next(stream))
        except BaseException as exc:  # noqa: BLE001 - the test asserts there is none
            outcome.append(exc)

    try:
        worker = threading.Thread(target=make_chunk)
        worker.start()
        assert entered.wait(timeout=30)
        stream.close()  # the chunk is in flight
        assert thread.is_alive()
        release.set()
        worker.join(timeout=30)
        assert not worker.is_alive()
    finally:
        del be.decode
    thread.join(timeout=10)
    assert not thread.is_alive() and stream.closed
    # the in-flight chunk was handed out whole (chunk 1: 12 frames of this model), and nothing was
    # computed ahead for a stream that is closed
    (chunk,) = outcome
    assert isinstance(chunk, Chunk) and chunk.index == 1 and len(chunk.frames) == 12
    assert stream._ahead is None
    with pytest.raises(StopIteration):
        next(stream)


# ---- the shipped bundle -----------------------------------------------------------------------------


def test_the_shipped_bundle_gives_the_serial_frames():
    """Also against the serial default of a 2-core machine (the VAE on two threads): onnxruntime's CPU
    kernels give these graphs the same bits on one thread and on two."""
    bundle = default_engine_dir()
    on = Streamer.from_engine(bundle, threads=1, overlap=True)
    off = Streamer.from_engine(bundle, threads=1, overlap=False)
    two = Streamer.from_engine(bundle, threads=2, overlap=False)
    switches = {3: [("a blue square moving left", False)]}
    want = run(off, 6, switches=switches)
    assert_same(run(on, 6, switches=switches), want)
    assert_same(run(two, 6, switches=switches), want)
