"""Fault suite, outputs: rf-generate / rf-eval / rf-bench never leave a file that lies at a final name,
check output paths before working, and say what happened in one line (full and read-only disks on a
small tmpfs, a killed encoder, bad numbers, paths that are directories)."""

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("imageio_ffmpeg")

from fault_tools import assert_no_output, assert_one_line_error, fill, run_cli, tmpfs  # noqa: E402

from rf_runtime.cli import bench_main, eval_main, generate_main  # noqa: E402
from rf_runtime.video import Mp4Writer, read_mp4  # noqa: E402


def generate(capsys, engine_dirs, out, *extra, seconds="1"):
    return run_cli(
        generate_main,
        [
            "--bundle",
            engine_dirs[1],
            "--prompt",
            "a red circle",
            "--seconds",
            seconds,
            "--out",
            out,
            "--quiet",
            *extra,
        ],
        capsys,
    )


def test_a_good_video_is_checked_and_renamed(engine_dirs, sandbox, capsys):
    """The positive control: exit 0, the file at its name reads back with round(seconds * fps) frames."""
    code, out, err = generate(capsys, engine_dirs, "v.mp4", seconds="1.5")
    assert code == 0, err
    assert read_mp4("v.mp4").shape[0] == 24 and os.listdir(".") == ["v.mp4"]


def test_out_is_a_directory(engine_dirs, sandbox, capsys):
    os.mkdir("v.mp4")
    code, _, err = generate(capsys, engine_dirs, "v.mp4")
    assert_one_line_error(code, err, "rf-generate", "v.mp4", "is a directory")
    assert os.path.isdir("v.mp4") and os.listdir("v.mp4") == []


def test_out_in_a_missing_folder(engine_dirs, sandbox, capsys):
    code, _, err = generate(capsys, engine_dirs, "no/such/v.mp4")
    assert_one_line_error(code, err, "rf-generate", "does not exist")
    assert not os.path.exists("no")


def test_out_not_an_mp4(engine_dirs, sandbox, capsys):
    code, _, err = generate(capsys, engine_dirs, "v.avi")
    assert_one_line_error(code, err, "rf-generate", "must end in .mp4")
    assert_no_output("v.avi")


@pytest.mark.parametrize("seconds", ["1e308", "inf", "nan", "0", "-1", "604801"])
def test_seconds_must_be_a_sane_number(engine_dirs, sandbox, capsys, seconds):
    code, _, err = generate(capsys, engine_dirs, "v.mp4", seconds=seconds)
    assert_one_line_error(code, err, "rf-generate", "--seconds must be a number > 0 and at most 604800")
    assert_no_output("v.mp4")


def test_a_read_only_disk_is_refused_before_the_model_loads(engine_dirs, sandbox, capsys, monkeypatch):
    from rf_runtime import cli

    monkeypatch.setattr(
        cli, "_load_streamer", lambda args: pytest.fail("the model loaded before the path check")
    )
    with tmpfs(sandbox.work / "ro", ro=True) as ro:
        code, _, err = generate(capsys, engine_dirs, ro / "v.mp4")
        assert_one_line_error(code, err, "rf-generate", "read-only file system")
        assert os.listdir(ro) == []


def test_a_full_disk_leaves_no_video_and_says_so(engine_dirs, sandbox, capsys):
    with tmpfs(sandbox.work / "full", size="1m") as full:
        fill(full, leave=8192)
        code, _, err = generate(capsys, engine_dirs, full / "v.mp4", seconds="12")
        line = assert_one_line_error(code, err, "rf-generate", "ffmpeg")
        assert "nothing was written" in line or "reads back with" in line
        assert_no_output(full / "v.mp4")
        assert os.listdir(full) == [".filler"]


def test_an_existing_video_survives_a_failed_run(engine_dirs, sandbox, capsys):
    with tmpfs(sandbox.work / "full", size="1m") as full:
        (full / "v.mp4").write_bytes(b"the user's video")
        fill(full, leave=8192)
        code, _, err = generate(capsys, engine_dirs, full / "v.mp4", seconds="12")
        assert code == 2 and (full / "v.mp4").read_bytes() == b"the user's video"


def test_a_killed_encoder_keeps_the_frames_it_finished(engine_dirs, sandbox, capsys, monkeypatch):
    real_write = Mp4Writer.write
    killed = []

    def write_then_kill(self, frames):
        real_write(self, frames)
        if self.frames_written >= 64 and not killed:
            time.sleep(1.5)  # let ffmpeg finish some fragments
            os.kill(self._proc.pid, signal.SIGKILL)
            killed.append(self.frames_written)

    monkeypatch.setattr(Mp4Writer, "write", write_then_kill)
    code, _, err = generate(capsys, engine_dirs, "v.mp4", seconds="10")
    line = assert_one_line_error(code, err, "rf-generate", "ffmpeg", "killed by signal 9", "kept the")
    kept = int(line.split("kept the ")[1].split()[0])
    frames = read_mp4("v.mp4")
    assert 0 < kept <= killed[0] < 160 and frames.shape[0] == kept
    assert os.listdir(".") == ["v.mp4"]


def test_eval_of_a_file_that_is_not_a_video(sandbox, capsys):
    (sandbox.work / "notes.mp4").write_text("not a video at all")
    code, _, err = run_cli(eval_main, ["notes.mp4", "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-eval", "notes.mp4", "not a readable video")


@pytest.mark.parametrize(
    "make, needle", [(lambda: os.mkdir("clip.mp4"), "is a directory"), (lambda: None, "does not exist")]
)
def test_eval_of_a_directory_or_nothing(sandbox, capsys, make, needle):
    make()
    code, _, err = run_cli(eval_main, ["clip.mp4", "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-eval", "clip.mp4", needle)


def test_eval_json_into_a_directory_is_refused_before_work(sandbox, capsys, monkeypatch):
    from rf_runtime import video

    monkeypatch.setattr(
        video, "read_mp4", lambda path: pytest.fail("the video was read before the --json check")
    )
    os.mkdir("m.json")
    code, _, err = run_cli(eval_main, ["clip.mp4", "--json", "m.json", "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-eval", "m.json", "is a directory")


def test_bench_json_into_a_directory_is_refused_before_work(engine_dirs, sandbox, capsys, monkeypatch):
    from rf_runtime import bench

    monkeypatch.setattr(
        bench, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran before the --json check")
    )
    os.mkdir("r.json")
    code, _, err = run_cli(
        bench_main, ["--bundle", engine_dirs[1], "--chunks", "3", "--json", "r.json"], capsys
    )
    assert_one_line_error(code, err, "rf-bench", "r.json", "is a directory")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--soak", "0"], "--soak takes minutes"),
        (["--soak", "-5"], "--soak takes minutes"),
        (["--soak", "nan"], "--soak takes minutes"),
        (["--soak", "1", "--model-dir", "m"], "--soak streams an engine bundle"),
    ],
)
def test_soak_arguments(engine_dirs, sandbox, capsys, argv, needle):
    code, _, err = run_cli(bench_main, ["--bundle", engine_dirs[1], *argv, "--json", "s.json"], capsys)
    assert_one_line_error(code, err, "rf-bench", needle)
    assert_no_output("s.json")


def test_soak_reports_what_it_promises(engine_dirs, sandbox, capsys):
    """A short soak: chunks counted, RSS sampled, the guard timed, no non-finite or constant chunk; the JSON
    agrees with the printed table."""
    import json

    code, out, err = run_cli(
        bench_main, ["--bundle", engine_dirs[1], "--soak", "0.15", "--json", "s.json"], capsys
    )
    assert code == 0, err
    r = json.loads(open("s.json").read())
    assert r["chunks"] >= 1 and r["frames"] == 9 + 12 * (r["chunks"] - 1)
    assert (
        r["rss_start_mib"] > 0
        and r["rss_end_mib"] > 0
        and r["non_finite_chunks"] == []
        and r["constant_chunks"] == []
    )
    assert 0 < r["guard_s_median"] < r["chunk_s_median"]
    assert f"{r['chunks']} chunks" in out and "RSS slope MiB per hour" in out


def test_soak_summary_by_hand():
    """summarize_soak against hand-worked numbers: a linear RSS of 2 MiB per minute is +120 MiB/h, the windows
    are chunks 10..29 and the last 20, a constant chunk and a non-finite chunk are listed."""
    from rf_runtime.soak import summarize_soak

    n = 100
    at = np.arange(n) * 2.0  # one chunk every 2 s: 198 s
    rss = 100 + at / 60 * 2  # 2 MiB per minute
    times = np.where(np.arange(n) < 50, 0.1, 0.2)
    r = summarize_soak(
        times,
        times / 100,
        at,
        rss,
        frames=1197,
        wall_s=198,
        minutes=3.3,
        non_finite=[{"chunk": 7, "error": "x"}],
        constant=[3],
        bundle="b",
        describe={"backend": "x"},
    )
    assert r["rss_slope_mib_per_hour"] == pytest.approx(120.0)
    assert r["early_chunks"] == [10, 29] and r["late_chunks"] == [80, 99]
    assert (
        r["chunk_s_early_median"] == 0.1 and r["chunk_s_late_median"] == 0.2 and r["late_over_early"] == 2.0
    )
    assert r["guard_fraction_of_chunk"] == pytest.approx(0.01)
    assert (
        r["rss_fit_from_s"] == 60.0
        and r["constant_chunks"] == [3]
        and r["non_finite_chunks"][0]["chunk"] == 7
    )
