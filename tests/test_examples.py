"""Every script in examples/ runs (as a user would start it, in its own process) on the bundle that
ships with rf_runtime, and does what it says."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytest.importorskip("onnxruntime")


def run(name: str, *args: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def frames_of(streamer_frames: list[int], total: int) -> list[int]:
    """Chunk sizes of a stream cut at ``total`` frames."""
    out, left = [], total
    for n in streamer_frames:
        if left <= 0:
            break
        out.append(min(n, left))
        left -= n
    return out


def shipped():
    from rf_runtime import Streamer

    return Streamer.load()


def test_every_example_has_a_test():
    tested = {"embed_stream.py", "headless_mp4.py", "prompt_switch.py", "save_resume.py"}
    assert {f for f in os.listdir(EXAMPLES) if f.endswith(".py")} == tested


def test_embed_stream_shows_every_frame_as_its_chunk_arrives(tmp_path):
    out = run("embed_stream.py", "--seconds", "1", cwd=tmp_path)
    info = shipped().info
    sizes = frames_of([info.frames_of_chunk(i) for i in range(100)], info.fps)
    lines = [line for line in out.splitlines() if line.startswith("chunk ")]
    assert [int(line.split()[2]) for line in lines] == sizes
    assert f"showed {info.fps} frames" in out and "engine bundle" in out


def test_headless_mp4_writes_the_video(tmp_path):
    from rf_runtime.video import read_mp4

    run("headless_mp4.py", "--seconds", "1.5", "--out", "ball.mp4", cwd=tmp_path)
    info = shipped().info
    assert read_mp4(tmp_path / "ball.mp4").shape == (24, *info.frame_hw, 3)
    assert sorted(os.listdir(tmp_path)) == ["ball.mp4"]  # no temporary file left


def test_prompt_switch_changes_the_prompt_every_few_chunks(tmp_path):
    from rf_runtime.video import read_mp4

    out = run("prompt_switch.py", "--every", "2", "--out", "switch.mp4", cwd=tmp_path)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("from chunk")] == [
        "from chunk 0",
        "from chunk 2",
        "from chunk 4",
    ]
    streamer = shipped()
    sizes = [streamer.info.frames_of_chunk(i) for i in range(6)]
    frames = read_mp4(tmp_path / "switch.mp4").astype(np.float64)
    assert len(frames) == sum(sizes)
    # against the same stream without a switch: the same before the first switch (up to the MP4's
    # lossy coding), different after the second
    straight = np.concatenate(
        [c.frames for _, c in zip(range(6), streamer.open("a red circle bouncing", seed=0))]
    )
    before, after = sum(sizes[:2]), sum(sizes[:4])
    d_before = np.abs(frames[:before] - straight[:before]).mean()
    d_after = np.abs(frames[after:] - straight[after:]).mean()
    assert d_after > 2 * d_before and d_after > 4.0, (d_before, d_after)


def test_save_resume_gives_identical_frames(tmp_path):
    out = run("save_resume.py", "--chunks", "5", "--save-at", "2", "--snapshot", "s.npz", cwd=tmp_path)
    assert "frames identical bit for bit" in out
    assert (tmp_path / "s.npz").is_file()
