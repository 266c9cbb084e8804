"""Streamer.from_engine on an fp32 bundle through the onnxruntime runners: the same frames as the
PyTorch reference streamer, no torch import, buffers allocated once (nothing per chunk but the
returned frames), several streams on one loaded bundle, and the backend choice."""

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from rf_runtime import Streamer  # noqa: E402
from rf_runtime.backends.engine import EngineBackend  # noqa: E402
from rf_runtime.backends.select import choose_backend  # noqa: E402
from rf_runtime.errors import ConfigError, MissingDependencyError  # noqa: E402
from rf_runtime.runners import Buffer, RunnerError  # noqa: E402
from rf_runtime.sampler import chunk_noise  # noqa: E402


def test_engine_frames_equal_checkpoint_frames(engine_dirs):
    model, bundle = engine_dirs
    n = 9 + 12 * 7  # 8 chunks: through evictions and EMA folds
    ref = np.concatenate(
        list(Streamer.from_checkpoint(model).stream("a red circle bouncing", seed=3, num_frames=n))
    )
    got = np.concatenate(
        list(Streamer.from_engine(bundle).stream("a red circle bouncing", seed=3, num_frames=n))
    )
    assert got.shape == ref.shape == (n, 32, 48, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # uint8 frames may differ by one level


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_engine_ema_alpha_at_load_equals_the_reference_at_that_alpha(engine_dirs, alpha):
    """The EMA-Sink rate is the cache-update graph's `mix` input: a bundle streams any rate (1 = static
    sink) as the PyTorch reference does with that rate, and unlike the bundle's own rate (0.9)."""
    from rf_runtime import model_dir as folder

    model, bundle = engine_dirs
    n = 9 + 12 * 7  # 8 chunks: 3 evictions and folds
    settings = folder.stream_settings(folder.read_card(model), ema_alpha=alpha)
    ref = np.concatenate(
        list(
            Streamer.from_checkpoint(model, settings=settings).stream(
                "a red circle bouncing", seed=3, num_frames=n
            )
        )
    )
    engine = Streamer.from_engine(bundle, ema_alpha=alpha)
    assert engine.info.settings.ema_alpha == alpha
    got = np.concatenate(list(engine.stream("a red circle bouncing", seed=3, num_frames=n)))
    own = np.concatenate(
        list(Streamer.from_engine(bundle).stream("a red circle bouncing", seed=3, num_frames=n))
    )
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # uint8 frames may differ by one level
    # the rate does change the later chunks of this random model (by a few levels): more than rounding
    assert np.abs(own.astype(int) - ref.astype(int)).max() > 1
    with pytest.raises(ConfigError, match="ema_alpha"):
        Streamer.from_engine(bundle, ema_alpha=1.5)


def test_engine_stream_does_not_import_torch(engine_dirs):
    _, bundle = engine_dirs
    code = (
        "import sys; from rf_runtime import Streamer; s = Streamer.from_engine(sys.argv[1]); "
        "f = [len(x) for x in s.stream('a cube', num_frames=21)]; assert f == [9, 12], f; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class ChunkLoop:
    """A chunk loop over the Backend interface with every chunk's noise drawn up front, for looking at a
    stream's buffers between the steps of a chunk (the streamer's own loop is ``Stream``)."""

    def __init__(self, backend, prompt, chunks, seed=0):
        self.be = backend
        self.state = backend.new_stream(backend.encode_prompt(prompt))
        info = backend.info
        rng = np.random.Generator(np.random.PCG64(seed))
        self.noise = [
            chunk_noise(rng, info.settings, (1, info.latent_channels, *info.latent_hw)) for _ in range(chunks)
        ]
        self.steps = info.settings.num_steps
        self.next = 0

    def chunk(self):
        be, state = self.be, self.state
        init, fresh = self.noise[self.next]
        self.next += 1
        x = be.upload(init)
        for k in range(self.steps):
            x0, x = be.denoise_step(state, x, k, be.upload(fresh[k]) if k + 1 < self.steps else None)
        be.cache_pass(state, x0)
        return be.decode(state, x0)


def stream_buffers(state) -> dict:
    """Every buffer a stream's bindings point at, and its latent ring: {(binding, tensor): data address}."""
    s = state.device
    bindings = {
        "dit": s.dit,
        "update0": s.updates[0],
        "update1": s.updates[1],
        "vae_first": s.vae_first,
        "vae0": s.vae[0],
        "vae1": s.vae[1],
    }
    ring = {("ring", str(i)): buf.ptr for i, buf in enumerate(s.latents)}
    return {
        (b, name): buf.ptr for b, binding in bindings.items() for name, buf in binding.buffers.items()
    } | ring


SLACK = 3 * 1024  # bytes of short-lived Python objects (views, small dicts, the Chunk) a chunk may touch
# with the decode overlapped, the two threads' short-lived objects exist at once (the peak is their sum),
# plus the hand-over to the decode thread (~200 B) and the RNG state kept for a snapshot (~300 B)
SLACK_OVERLAP = 4 * 1024


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_steady_state_allocates_nothing_but_the_frames(engine_dirs, overlap):
    """The streamer's own chunk loop (noise drawn in place, x0 kept in the latent ring, cache pass,
    decode; with overlap the decode in its thread beside the next chunk's steps) allocates nothing
    per chunk beyond the returned frames."""
    backend = EngineBackend.load(engine_dirs[1], overlap=overlap)
    stream = Streamer(backend).open("a red circle bouncing", seed=0)
    assert stream.overlap is overlap
    slack = SLACK_OVERLAP if overlap else SLACK
    state = stream._state
    x_bytes = state.device.x[0].nbytes
    assert x_bytes > slack  # so one chunk-latent-sized array allocated per chunk would fail the test
    for _ in range(3):  # chunks 0, 1, 2: the cache fills; chunk 2 on is the steady state
        next(stream)
    allowed = set(stream_buffers(state).values())
    ring = state.device.latents
    if overlap:  # the VAE reads the latent frames of the ring slot it decodes (views into the ring)
        allowed |= {z.ptr for frames in state.device.ring_z for z in frames}
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        kept = []
        for _ in range(7):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            frames = next(stream).frames
            current, peak = tracemalloc.get_traced_memory()
            kept.append(frames)
            assert frames.shape == (12, 32, 48, 3)
            assert peak - before <= frames.nbytes + slack, (
                f"a chunk allocated {peak - before - frames.nbytes} B"
            )
            assert current - before <= frames.nbytes + slack
        growth = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert growth <= sum(f.nbytes for f in kept) + slack  # nothing retained but the frames
    # every buffer bound now is one that was bound before the measured chunks: none was replaced
    assert set(stream_buffers(state).values()) <= allowed
    for buf in (state.device.x0, *state.device.x, *state.device.kv[0], *ring):
        assert buf.host.ctypes.data == buf.ptr  # host buffers were written in place, never reallocated
    # the last chunk's clean latents were copied into its ring slot, the one before it kept its own
    last = (stream.chunk_index - 1) % len(ring)
    if overlap:  # x0 holds the next chunk, made ahead; the ring slots hold the last two chunks
        assert stream._ahead.x0 is state.device.x0
        assert not np.array_equal(ring[last].host, state.device.x0.host)
        assert not np.array_equal(ring[last].host, ring[(last - 1) % len(ring)].host)
    else:
        np.testing.assert_array_equal(ring[last].host, state.device.x0.host)
        assert not np.array_equal(ring[(last - 1) % len(ring)].host, state.device.x0.host)


def test_outputs_land_in_the_bound_buffers(engine_dirs):
    """The step's x0 the streamer gets back is the stream's one x0 buffer, holding fresh results."""
    backend = EngineBackend.load(engine_dirs[1])
    loop = ChunkLoop(backend, "a cube", chunks=3)
    loop.chunk()
    s = loop.state.device
    x0_ptr, seen = s.x0.ptr, []
    init, fresh = loop.noise[1]
    x = backend.upload(init)
    for k in range(loop.steps):
        x0, x = backend.denoise_step(
            loop.state, x, k, backend.upload(fresh[k]) if k + 1 < loop.steps else None
        )
        assert isinstance(x0, Buffer) and x0 is s.x0 and x0.ptr == x0_ptr
        seen.append(x0.host.copy())
    assert not np.array_equal(seen[0], seen[-1])  # each step wrote new values into the same memory
    with pytest.raises(RunnerError, match="ping-pong"):
        s.dit.set("x", s.x0)  # x0 is an output of the same call: the runner refuses the alias


def test_two_interleaved_streams_equal_each_alone(engine_dirs):
    streamer = Streamer.from_engine(engine_dirs[1])
    n = 9 + 12 * 3
    alone_a = list(streamer.stream("a red circle bouncing", seed=1, num_frames=n))
    alone_b = list(streamer.stream("a blue square sliding", seed=2, num_frames=n))
    a = streamer.stream("a red circle bouncing", seed=1, num_frames=n)
    b = streamer.stream("a blue square sliding", seed=2, num_frames=n)
    mixed_a, mixed_b = [], []
    for fa, fb in zip(a, b):  # chunk by chunk, alternating, on one set of sessions
        mixed_a.append(fa)
        mixed_b.append(fb)
    assert len(mixed_a) == len(alone_a) == 4
    for x, y in zip(mixed_a, alone_a):
        assert np.array_equal(x, y)
    for x, y in zip(mixed_b, alone_b):
        assert np.array_equal(x, y)
    assert not np.array_equal(alone_a[-1], alone_b[-1])  # the two streams really differ


def test_backend_choice(engine_dirs):
    from rf_runtime.bundle import Bundle

    bundle = Bundle.load(engine_dirs[1])
    no_trt = lambda: (None, None)  # noqa: E731
    assert choose_backend(bundle, "auto", "cpu", no_trt) == "onnxruntime"
    assert choose_backend(bundle, "auto", "cuda", no_trt) == "onnxruntime"  # no plans in this bundle
    with pytest.raises(ConfigError, match="device='cuda'"):
        choose_backend(bundle, "tensorrt", "cpu", no_trt)
    with pytest.raises(ConfigError, match="backend must be one of"):
        choose_backend(bundle, "openvino", "cpu", no_trt)
    with pytest.raises(ConfigError, match="device must be one of"):
        choose_backend(bundle, "auto", "tpu", no_trt)


def test_unavailable_backends_are_errors_not_fallbacks(engine_dirs):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match=r"rf_runtime\[gpu\]"):
        Streamer.from_engine(engine_dirs[1], backend="tensorrt", device="cuda")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RunnerError, match="no CUDAExecutionProvider"):
            Streamer.from_engine(engine_dirs[1], backend="onnxruntime", device="cuda")
