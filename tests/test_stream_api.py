"""The Stream object: prompt switch with LongLive's re-cache, save/resume, concurrent streams, timing.

The re-cache is checked against a cache built by hand from ``CausalDiT.forward_chunk`` calls on the
clean latents of the reference loop (``generate_latents``), and the two backends against each other.
"""

import os

import numpy as np
import pytest
import torch

from rf_runtime import InputError, Streamer
from rf_runtime.models.rollout import generate_latents
from rf_runtime.sampler import chunk_noise
from rf_runtime.snapshot import SnapshotError, StreamSnapshot
from rf_runtime.streamer import recache_plan
from rf_runtime.testing import HEIGHT, TEXT, WIDTH, write_model_dir

pytest.importorskip("onnxruntime")

A, B = "a red circle bouncing", "a blue square spinning slowly"


@pytest.fixture(scope="module")
def torch_streamer(engine_dirs):
    return Streamer.from_checkpoint(engine_dirs[0])


@pytest.fixture(scope="module")
def engine_streamer(engine_dirs):
    return Streamer.from_engine(engine_dirs[1])


@pytest.fixture(scope="module")
def overlap_streamer(engine_dirs):
    """The bundle with the decode of chunk n beside the steps of chunk n+1, on any number of cores."""
    return Streamer.from_engine(engine_dirs[1], overlap=True)


@pytest.fixture(params=["torch", "onnxruntime", "onnxruntime-overlap"])
def streamer(request, torch_streamer, engine_streamer, overlap_streamer):
    return {"torch": torch_streamer, "onnxruntime": engine_streamer}.get(request.param, overlap_streamer)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def frames_of(chunks):
    return np.concatenate([c.frames for c in chunks])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- the iterator and the timing breakdown ----------------------------------------------------------


def test_open_gives_the_stream_chunks_video_with_timings(streamer):
    old = frames_of(list(streamer.stream_chunks(A, seed=2, num_frames=9 + 12 + 5)))
    chunks = list(streamer.open(A, seed=2, num_frames=9 + 12 + 5))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.start_frame for c in chunks] == [0, 9, 21]
    assert [len(c.frames) for c in chunks] == [9, 12, 5]
    assert np.array_equal(frames_of(chunks), old)
    for c in chunks:
        assert 0 < c.denoise_seconds and 0 < c.decode_seconds < c.seconds  # the decode ends in its call
        if not streamer.backend.overlap:  # one after the other, in the call
            assert c.denoise_seconds + c.decode_seconds <= c.seconds + 1e-9
    # with overlap the parts run at once and a chunk's steps in the call before it; chunk 0's in its own
    assert chunks[0].denoise_seconds < chunks[0].seconds


# ---- prompt switch (LongLive re-cache) ---------------------------------------------------------------


def test_recache_plan_follows_longlive():
    from rf_runtime import StreamSettings

    s = StreamSettings()  # sink 3 + window 6 frames: the cache holds 2 chunks (sink + 1 window slot)
    assert recache_plan(s, 0, keep_sink=False) == (0, range(0, 0))  # nothing made yet: only the text changes
    assert recache_plan(s, 1, keep_sink=False) == (0, range(0, 1))
    assert recache_plan(s, 7, keep_sink=False) == (
        0,
        range(5, 7),
    )  # the last two chunks, the older one -> sink
    assert recache_plan(s, 7, keep_sink=True) == (1, range(6, 7))  # the sink stays, the window is re-run
    assert recache_plan(s, 1, keep_sink=True) == (1, range(1, 1))
    wide = StreamSettings(window_frames=12)  # 3 window slots: the cache holds 4 chunks
    assert recache_plan(wide, 9, keep_sink=False) == (0, range(5, 9))
    assert recache_plan(wide, 2, keep_sink=True) == (1, range(1, 2))
    no_sink = StreamSettings(sink_frames=0)
    assert recache_plan(no_sink, 5, keep_sink=True) == (0, range(4, 5))


def reference_latents(streamer, prompt, seed, chunks):
    """Clean latents of each chunk from the reference loop, on the noise a Stream draws."""
    be = streamer.backend
    settings, (h, w) = streamer.settings, streamer.info.latent_hw
    rng = np.random.Generator(np.random.PCG64(seed))
    noise, ren = zip(*(chunk_noise(rng, settings, (1, 16, h, w)) for _ in range(chunks)))
    x0 = generate_latents(
        be.dit,
        torch.from_numpy(TEXT.encode([prompt])),
        torch.from_numpy(np.concatenate(noise, axis=1)),
        torch.from_numpy(np.concatenate(ren, axis=2)),
        settings,
    )
    return x0.split(settings.chunk_frames, dim=1)


@pytest.mark.parametrize("keep_sink", [False, True])
def test_prompt_switch_recaches_like_hand_built_longlive(torch_streamer, keep_sink):
    be, n = torch_streamer.backend, 3  # 3 chunks: the window has evicted chunk 1 and folded it into the sink
    stream = torch_streamer.open(A, seed=4)
    take(stream, n)
    before = stream.save_state().state
    stream.set_prompt(B, keep_sink=keep_sink)
    after = stream.save_state().state

    x0 = reference_latents(torch_streamer, A, 4, n)
    dit, tpf = be.dit, be.dit.tokens_per_frame(torch_streamer.info.latent_hw)
    with torch.no_grad():
        text_k, text_v = dit.text_kv(torch.from_numpy(TEXT.encode([B])))
        ctx_k, ctx_v = torch.zeros(before.cache_k.shape), torch.zeros(before.cache_v.shape)
        t0 = torch.zeros(1, 3)  # context_t = 0
        if (
            keep_sink
        ):  # LongLive global_sink: the sink keeps its keys/values, the last chunk is re-run after it
            ctx_k[:, :, : 3 * tpf] = torch.from_numpy(before.cache_k[:, :, : 3 * tpf])
            ctx_v[:, :, : 3 * tpf] = torch.from_numpy(before.cache_v[:, :, : 3 * tpf])
            _, k, v = dit.forward_chunk(x0[n - 1], t0, text_k, text_v, ctx_k, ctx_v, 3)
        else:  # the last two chunks re-run block-causally: the older one alone (-> sink), then the newer
            _, k, v = dit.forward_chunk(x0[n - 2], t0, text_k, text_v, ctx_k, ctx_v, 0)
            ctx_k[:, :, : 3 * tpf], ctx_v[:, :, : 3 * tpf] = k, v
            _, k, v = dit.forward_chunk(x0[n - 1], t0, text_k, text_v, ctx_k, ctx_v, 3)
        ctx_k[:, :, 3 * tpf :], ctx_v[:, :, 3 * tpf :] = k, v
    assert rel_err(after.cache_k, ctx_k.numpy()) < 1e-5 and rel_err(after.cache_v, ctx_v.numpy()) < 1e-5
    assert np.array_equal(after.text_k, text_k.numpy())
    assert after.chunks_committed == 2
    if keep_sink:
        assert np.array_equal(after.cache_k[:, :, : 3 * tpf], before.cache_k[:, :, : 3 * tpf])
    else:
        assert (
            rel_err(after.cache_k[:, :, : 3 * tpf], before.cache_k[:, :, : 3 * tpf]) > 1e-2
        )  # the sink changed


@pytest.mark.parametrize("keep_sink", [False, True])
def test_prompt_switch_engine_equals_torch(torch_streamer, engine_streamer, keep_sink):
    runs = {}
    for name, s in (("torch", torch_streamer), ("engine", engine_streamer)):
        stream = s.open(A, seed=7)
        take(stream, 3)
        stream.set_prompt(B, keep_sink=keep_sink)
        runs[name] = (stream.save_state().state, frames_of(take(stream, 1)))
    (t_state, t_after), (e_state, e_after) = runs["torch"], runs["engine"]
    assert (
        rel_err(e_state.cache_k, t_state.cache_k) < 1e-4 and rel_err(e_state.cache_v, t_state.cache_v) < 1e-4
    )
    assert (
        np.abs(e_after.astype(int) - t_after.astype(int)).max() <= 1
    )  # uint8 frames may differ by one level


@pytest.mark.parametrize("keep_sink", [False, True])
def test_prompt_switch_changes_the_scene_without_a_cut(engine_streamer, keep_sink):
    plain = take(engine_streamer.open(A, seed=7), 6)  # no switch
    fresh = take(engine_streamer.open(B, seed=7), 6)  # prompt B from the start
    stream = engine_streamer.open(A, seed=7)
    before = take(stream, 3)
    stream.set_prompt(B, keep_sink=keep_sink)
    after = take(stream, 3)
    assert np.array_equal(frames_of(plain[:3]), frames_of(before))  # before the switch: the same video

    def change(x, y):
        return np.abs(x.frames.astype(int) - y.frames.astype(int))

    # no cut: the first chunk after the switch stays close to the old scene (closer than prompt B from scratch)...
    assert (
        1 < change(after[0], plain[3]).max()
        and change(after[0], plain[3]).mean() < change(fresh[3], plain[3]).mean()
    )
    # ... and the new prompt takes over: two chunks later the video has moved at least half-way to prompt B's
    assert change(after[2], plain[5]).mean() > 0.5 * change(fresh[5], plain[5]).mean()


def test_set_prompt_before_the_first_chunk_is_a_new_prompt(engine_streamer):
    s = engine_streamer.open(A, seed=3)
    s.set_prompt(B)
    assert np.array_equal(frames_of(take(s, 2)), frames_of(take(engine_streamer.open(B, seed=3), 2)))
    with pytest.raises(InputError, match="prompt"):
        s.set_prompt("  ")


# ---- save / resume --------------------------------------------------------------------------------------


def test_resume_is_bit_exact(streamer, tmp_path):
    whole = frames_of(take(_switching_stream(streamer), 4))
    stream = _switching_stream(streamer)
    head = take(stream, 2)
    path = stream.save_state().save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == ["s.npz"]  # written atomically, no temporary left behind
    stream.close()
    snap = StreamSnapshot.load(path)
    assert (snap.chunk_index, snap.frames_emitted, snap.prompt) == (2, 21, B)
    assert snap.prompt_history == ((0, A), (1, B))
    for _ in range(2):  # resuming twice from one snapshot: the snapshot is not consumed
        resumed = streamer.resume(snap)
        tail = take(resumed, 2)
        assert [c.index for c in tail] == [2, 3] and tail[0].start_frame == 21
        assert np.array_equal(np.concatenate([frames_of(head), frames_of(tail)]), whole)


def _switching_stream(streamer):
    """A stream that switches to prompt B before its second chunk."""

    class Switching:
        def __init__(self):
            self.stream = streamer.open(A, seed=9)

        def __next__(self):
            if self.stream.chunk_index == 1:
                self.stream.set_prompt(B)
            return next(self.stream)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    return Switching()


def test_snapshot_moves_between_backends(torch_streamer, engine_streamer):
    stream = torch_streamer.open(A, seed=6)
    take(stream, 2)
    tail_torch = frames_of(take(torch_streamer.resume(stream.save_state()), 1))
    tail_engine = frames_of(take(engine_streamer.resume(stream.save_state()), 1))
    assert np.abs(tail_engine.astype(int) - tail_torch.astype(int)).max() <= 1


def test_bad_snapshots_are_refused(engine_streamer, tmp_path):
    with pytest.raises(SnapshotError, match="does not exist"):
        StreamSnapshot.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(SnapshotError, match="junk.npz.*not a stream snapshot"):
        StreamSnapshot.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(SnapshotError, match="no valid snapshot header"):
        StreamSnapshot.load(tmp_path / "other.npz")

    stream = engine_streamer.open(A, seed=1)
    take(stream, 2)
    path = stream.save_state().save(tmp_path / "good.npz")
    data = open(path, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="cut.npz"):
        StreamSnapshot.load(tmp_path / "cut.npz")
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 0xFF  # one byte inside the cache arrays
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(SnapshotError, match="flip.npz"):
        StreamSnapshot.load(tmp_path / "flip.npz")
    with pytest.raises(SnapshotError, match="folder .* does not exist"):
        stream.save_state().save(tmp_path / "no" / "such" / "dir.npz")
    with pytest.raises(InputError, match="StreamSnapshot"):
        engine_streamer.resume(str(path))


def test_snapshot_of_another_geometry_is_refused(torch_streamer, tmp_path):
    write_model_dir(tmp_path / "wide", seed=5, stream={"ema_alpha": 0.9, "window_frames": 9})
    snap = Streamer.from_checkpoint(tmp_path / "wide").open(A, seed=1).save_state()
    with pytest.raises(
        SnapshotError, match="another geometry.*window_frames.*resume it on the model that made it"
    ):
        torch_streamer.resume(snap)


# ---- concurrent streams ---------------------------------------------------------------------------------


def test_interleaved_streams_equal_sequential_streams(streamer):
    seeds = ((A, 1), (B, 2))
    alone = [frames_of(take(streamer.open(p, seed=s), 3)) for p, s in seeds]
    streams = [streamer.open(p, seed=s) for p, s in seeds]
    got = [[], []]
    for order in ([0, 1], [1, 0], [0, 1]):  # round-robin in shifting orders
        for i in order:
            got[i].append(next(streams[i]))
    for i in range(2):
        assert np.array_equal(frames_of(got[i]), alone[i])
    assert got[0][0].frames.shape[1:] == (HEIGHT, WIDTH, 3)
