"""Fault suite, the stream: API arguments (one integer check), the numeric guard, snapshots (typed header,
finite arrays), and the snapshot writer on full and read-only disks."""

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fault_tools import (  # noqa: E402
    assert_no_output,
    assert_one_line_error,
    fill,
    nan_weight_bundle,
    run_cli,
    tmpfs,
)

from rf_runtime import Streamer  # noqa: E402
from rf_runtime.errors import InputError, OutputError, StreamError  # noqa: E402
from rf_runtime.snapshot import SnapshotError, StreamSnapshot  # noqa: E402


@pytest.fixture(scope="module")
def streamer(engine_dirs):
    return Streamer.from_engine(engine_dirs[1])


# ---- API arguments: one integer check everywhere ----------------------------------------------------


@pytest.mark.parametrize("num_frames", [True, False, 0, -3, 2.5, "5", np.float64(5), np.bool_(True), [5]])
def test_num_frames_must_be_a_positive_integer(streamer, sandbox, num_frames):
    with pytest.raises(InputError, match=r"num_frames must be an integer >= 1 or None, got"):
        streamer.open("a red circle", num_frames=num_frames)


@pytest.mark.parametrize("seed", [True, -1, 1.0, "7", None])
def test_seed_must_be_a_non_negative_integer(streamer, sandbox, seed):
    with pytest.raises(InputError, match=r"seed must be an integer >= 0, got"):
        streamer.open("a red circle", seed=seed)


def test_numpy_integers_are_integers(streamer, sandbox):
    """np.int64 frames and np.uint32 seeds mean what the Python ints mean (same frames, bit for bit)."""
    a = np.concatenate(list(streamer.stream("a red circle", seed=np.uint32(7), num_frames=np.int64(5))))
    b = np.concatenate(list(streamer.stream("a red circle", seed=7, num_frames=5)))
    assert a.shape[0] == 5 and np.array_equal(a, b)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "prompt is empty"),
        ("   ", "prompt is empty"),
        (None, "must be a string"),
        (5, "must be a string"),
    ],
)
def test_bad_prompts(streamer, sandbox, prompt, match):
    with pytest.raises(InputError, match=match):
        streamer.open(prompt)


def test_resume_takes_a_snapshot(streamer, sandbox):
    with pytest.raises(InputError, match="resume takes a StreamSnapshot"):
        streamer.resume("fox.npz")


# ---- 5. the numeric guard ---------------------------------------------------------------------------


@pytest.fixture
def nan_bundle(engine_dirs, sandbox):
    """The tiny bundle with one weight of the DiT set to NaN, rehashed (a damaged export, consistently listed)."""
    return nan_weight_bundle(engine_dirs[1], sandbox.work / "nan-bundle")


def test_non_finite_latents_stop_the_stream_naming_the_chunk(nan_bundle, sandbox):
    stream = Streamer.from_engine(nan_bundle).open("a red circle", seed=0, num_frames=30)
    with pytest.raises(StreamError, match=r"chunk 0 of the stream has non-finite latents.*rf-export verify"):
        next(stream)


def test_the_guard_from_the_cli_is_one_line_and_no_video(nan_bundle, sandbox, capsys):
    from rf_runtime.cli import generate_main

    code, _, err = run_cli(
        generate_main,
        ["--bundle", nan_bundle, "--prompt", "a cat", "--seconds", "1", "--out", "v.mp4", "--quiet"],
        capsys,
    )
    assert_one_line_error(code, err, "rf-generate", "chunk 0", "non-finite")
    assert_no_output(sandbox.work / "v.mp4")


def test_the_guard_reads_what_each_backend_holds():
    """all_finite is True for finite latents and False for one NaN or one infinity, on every backend type."""
    torch = pytest.importorskip("torch")
    from rf_runtime.backends.base import Backend
    from rf_runtime.backends.pytorch import TorchBackend

    x = np.zeros((1, 3, 4, 4, 6), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y.flat[17] = bad
        assert not Backend.all_finite(None, y) and not TorchBackend.all_finite(None, torch.from_numpy(y))
    assert Backend.all_finite(None, x) and TorchBackend.all_finite(None, torch.from_numpy(x))


# ---- snapshots: typed header, finite arrays ------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_file(streamer, tmp_path_factory):
    stream = streamer.open("a red circle", seed=1)
    next(stream), next(stream)
    path = tmp_path_factory.mktemp("snap") / "s.npz"
    stream.save_state().save(path)
    return path


def _edit(src, dst, header=None, arrays=None):
    with np.load(src) as data:
        files = {k: data[k] for k in data.files}
    h = json.loads(str(files["header"]))
    if header:
        header(h)
    if arrays:
        arrays(files)
    files["header"] = np.array(json.dumps(h))
    np.savez(dst, **files)
    return dst


def _nan(name):
    def edit(files):
        files[name] = files[name].copy()
        files[name].flat[3] = np.nan

    return edit


SNAPSHOT_FAULTS = [
    ("geometry missing", dict(header=lambda h: h.pop("geometry")), r"header key 'geometry' is required"),
    (
        "another bit generator",
        dict(
            header=lambda h: h.update(
                rng_state=np.random.MT19937(0).state | {"state": {"key": [1, 2], "pos": 1}}
            )
        ),
        r"'rng_state.bit_generator' is 'MT19937'.*PCG64",
    ),
    ("seed as text", dict(header=lambda h: h.update(seed="1")), r"header key 'seed' must be an integer"),
    (
        "chunk_index a bool",
        dict(header=lambda h: h.update(chunk_index=True)),
        r"'chunk_index' must be an integer, got True",
    ),
    (
        "negative frames",
        dict(header=lambda h: h.update(frames_emitted=-9)),
        r"'frames_emitted' is -9, it must be >= 0",
    ),
    (
        "prompt_history malformed",
        dict(header=lambda h: h.update(prompt_history=[[0]])),
        r"'prompt_history\[0\]' must be a list of 2 values",
    ),
    (
        "geometry with an unknown key",
        dict(header=lambda h: h["geometry"].update(colour=1)),
        r"unknown header key 'geometry.colour'",
    ),
    (
        "a stream setting of the wrong type",
        dict(header=lambda h: h["geometry"]["stream"].update(window_frames="6")),
        r"'geometry.stream.window_frames' must be an integer",
    ),
    ("NaN in the KV cache", dict(arrays=_nan("cache_k")), r"cache_k holds NaN or infinite values"),
    ("NaN in the latents", dict(arrays=_nan("latents")), r"latents holds NaN or infinite values"),
    (
        "integer arrays",
        dict(arrays=lambda f: f.update(text_k=f["text_k"].astype(np.int32))),
        r"\['text_k'\] are not float32",
    ),
]


@pytest.mark.parametrize("what, edit, match", SNAPSHOT_FAULTS, ids=[f[0] for f in SNAPSHOT_FAULTS])
def test_every_snapshot_header_key_and_array_is_checked(snapshot_file, sandbox, what, edit, match):
    bad = _edit(snapshot_file, sandbox.work / "bad.npz", **edit)
    with pytest.raises(SnapshotError, match=match):
        StreamSnapshot.load(bad)


def test_the_snapshot_itself_resumes(snapshot_file, streamer, sandbox):
    """The positive control for the cases above: the unedited file (rewritten by _edit) loads and resumes."""
    same = _edit(snapshot_file, sandbox.work / "same.npz")
    a = next(streamer.resume(StreamSnapshot.load(same))).frames
    b = next(streamer.resume(StreamSnapshot.load(snapshot_file))).frames
    assert np.array_equal(a, b)


def test_a_directory_is_not_a_snapshot(sandbox):
    (sandbox.work / "snaps").mkdir()
    with pytest.raises(SnapshotError, match="is a directory"):
        StreamSnapshot.load(sandbox.work / "snaps")


def test_a_snapshot_is_never_saved_over_a_directory(snapshot_file, sandbox):
    snap = StreamSnapshot.load(snapshot_file)
    (sandbox.work / "keep").mkdir()
    (sandbox.work / "keep" / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="it is a directory"):
        snap.save(sandbox.work / "keep")
    assert os.listdir(sandbox.work / "keep") == ["mine.txt"]


def test_a_snapshot_on_a_read_only_disk(snapshot_file, sandbox):
    snap = StreamSnapshot.load(snapshot_file)
    with tmpfs(sandbox.work / "ro", ro=True) as ro:
        with pytest.raises(InputError, match="Read-only file system"):
            snap.save(ro / "s.npz")
        assert os.listdir(ro) == []


def test_a_snapshot_on_a_full_disk(snapshot_file, sandbox):
    snap = StreamSnapshot.load(snapshot_file)
    with tmpfs(sandbox.work / "full", size="1m") as full:
        fill(full, leave=os.path.getsize(snapshot_file) // 2)
        with pytest.raises(OutputError, match=r"could not write the snapshot to .*No space left on device"):
            snap.save(full / "s.npz")
        assert os.listdir(full) == [".filler"]  # no half file, no temporary
