"""scripts/device_check.sh, the prepared GPU speed check, runs end to end on a CPU with a tiny model
(RF_DEVICE_CHECK_SMOKE=1), so that it cannot rot between the days a GPU is lent."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke_run_writes_its_reports(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, RF_DEVICE_CHECK_SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["graphs-off.json", "graphs-on.json", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    for name, chunks in (("graphs-on", 4), ("graphs-off", 3)):
        s = summary[name]
        report = json.loads((out / f"{name}.json").read_text())["runs"][0]
        assert s["backend"] == "torch-static" and s["chunks"] == chunks and s["cuda_graphs"] is False
        assert s["end_to_end_fps"] == report["end_to_end_fps"] > 0
        assert 0 < s["latency_p50_s"] <= s["latency_p99_s"] and s["time_to_first_frame_s"] > 0
    ratio = summary["graphs_on_over_off"]["end_to_end_fps"]
    assert ratio == pytest.approx(
        summary["graphs-on"]["end_to_end_fps"] / summary["graphs-off"]["end_to_end_fps"]
    )


def test_device_check_refuses_a_machine_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
    assert os.listdir(tmp_path / "out") == []


def test_the_random_wan_folder_loads_and_streams(tmp_path):
    """The layout the device check writes for the 1.3B geometry (torch.save weights, the generator as a
    checkpoint, the hashed text encoder at the DiT's text size), written small here, loads and streams."""
    from rf_runtime import Streamer
    from rf_runtime.models import DiTConfig, VAEConfig
    from rf_runtime.testing import DIT, VAE, WAN_CHECKPOINT, write_wan_random_dir

    import torch

    path = write_wan_random_dir(
        tmp_path / "wan",
        dtype=torch.float32,
        dit_config=DiTConfig(**{**DIT.to_dict(), "text_dim": 16, "text_len": 8}),
        vae_config=VAEConfig(**VAE),
        resolution=(32, 48),
    )
    assert sorted(os.listdir(path)) == ["config.json", WAN_CHECKPOINT, "rf_runtime.json", "vae.pth"]
    streamer = Streamer.from_checkpoint(path, os.path.join(path, WAN_CHECKPOINT), static=True)
    assert streamer.info.frame_hw == (32, 48)
    assert [len(f) for f in streamer.stream("a red circle", num_frames=21)] == [9, 12]
