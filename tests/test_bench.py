"""rf-bench: the numbers are computed as DEFINITIONS says, and the CLI runs both backends on one model."""

import json
import os

import numpy as np
import pytest

from rf_runtime.bench import DEFINITIONS, summarize
from rf_runtime.cli import bench_main


def test_summarize_counts_what_it_says():
    # chunk 0: 9 frames in 1.0 s; chunks 1..4: 12 frames, 0.5 / 0.7 / 0.6 / 0.9 s (denoise 0.2 s, decode the rest)
    seconds = [1.0, 0.5, 0.7, 0.6, 0.9]
    per_chunk = [(s, 0.2, s - 0.2, 9 if i == 0 else 12, 2 * s) for i, s in enumerate(seconds)]
    r = summarize(per_chunk, load_s=2.0, ttff_s=1.5, stream_s=4.0, fps=16)
    assert r["frames"] == 9 + 12 * 4 == 57
    assert r["warmup_s"] == 3.5
    assert r["latency_p50_s"] == pytest.approx(0.65)  # median of 0.5, 0.6, 0.7, 0.9 (chunk 0 excluded)
    assert r["latency_p99_s"] == pytest.approx(0.7 + 0.97 * (0.9 - 0.7))  # linear interpolation at 99 %
    assert r["end_to_end_fps"] == pytest.approx(57 / 4.0)
    assert r["steady_fps"] == pytest.approx(48 / 2.7)
    assert r["denoise_fps"] == pytest.approx(57 / 1.0)
    assert r["realtime_factor"] == pytest.approx(57 / 4.0 / 16)


@pytest.mark.parametrize(
    "n, early, late",
    [
        (203, [8, 12], [198, 202]),
        (200, [8, 12], [195, 199]),
        (30, [8, 12], [25, 29]),
        (18, [8, 12], [13, 17]),
    ],
)
def test_flat_cost_windows(n, early, late):
    seconds = [1.0] + [0.5] * (n // 2) + [0.75] * (n - 1 - n // 2)
    seconds[late[0]] = 9.0  # one slow chunk moves the mean of its window, not the median
    r = summarize(
        [(s, s / 2, s / 2, 12, 3 * s) for s in seconds], load_s=0, ttff_s=1, stream_s=sum(seconds), fps=16
    )
    flat = r["flat_cost"]
    assert (flat["early_chunks"], flat["late_chunks"]) == (early, late)
    e, l_ = (seconds[a : b + 1] for a, b in (early, late))
    assert flat["early_mean_s"] == pytest.approx(np.mean(e)) and flat["late_mean_s"] == pytest.approx(
        np.mean(l_)
    )
    assert flat["late_over_early"] == pytest.approx(np.mean(l_) / np.mean(e))
    assert flat["late_over_early_median"] == pytest.approx(np.median(l_) / np.median(e))
    assert flat["late_cpu_median_s"] == pytest.approx(3 * np.median(l_))
    assert flat["late_over_early_cpu"] == pytest.approx(np.median(l_) / np.median(e))
    assert flat["comparable"] is True


@pytest.mark.parametrize("n", [12, 17])
def test_flat_cost_needs_two_separate_windows(n):
    # with fewer than 18 chunks the early (8..12) and late (last five) windows share chunks: a ratio
    # would be ~1 by construction, so it is not reported
    seconds = [1.0] + [0.5] * (n - 1)
    r = summarize(
        [(s, s / 2, s / 2, 12, s) for s in seconds], load_s=0, ttff_s=1, stream_s=sum(seconds), fps=16
    )
    flat = r["flat_cost"]
    assert flat["comparable"] is False
    assert np.isnan(flat["late_over_early"]) and np.isnan(flat["late_over_early_median"])
    assert np.isnan(flat["late_over_early_cpu"])


def test_rf_bench_runs_both_backends_on_one_model(engine_dirs, tmp_path, capsys):
    model, bundle = engine_dirs
    out = tmp_path / "bench.json"
    n = 6
    assert (
        bench_main(
            [
                "--bundle",
                str(bundle),
                "--model-dir",
                str(model),
                "--chunks",
                str(n),
                "--torch-threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert os.listdir(tmp_path) == ["bench.json"]  # no temporary left behind
    table = capsys.readouterr().out
    assert "end-to-end fps" in table and "onnxruntime / torch" in table
    report = json.loads(out.read_text())
    assert report["chunks"] == n and set(report["definitions"]) == set(DEFINITIONS)
    runs = {r["backend"]: r for r in report["runs"]}
    assert set(runs) == {"onnxruntime", "torch"}
    assert runs["onnxruntime"]["geometry"] == runs["torch"]["geometry"]  # the same model
    assert runs["torch"]["geometry"]["frame_hw"] == [32, 48] and runs["torch"]["threads"] == 1
    for r in runs.values():
        assert r["device"] == "cpu" and r["precision"] in ("fp32", "float32")
        pc = r["per_chunk"]
        assert r["frames"] == sum(pc["frames"]) == 9 + 12 * (n - 1)
        assert r["latency_p50_s"] <= r["latency_p99_s"] <= max(pc["seconds"][1:])
        assert r["warmup_s"] == pytest.approx(r["load_s"] + r["time_to_first_frame_s"])
        assert pc["seconds"][0] <= r["time_to_first_frame_s"] <= r["stream_s"]
        assert sum(pc["seconds"]) <= r["stream_s"]
        assert r["end_to_end_fps"] == pytest.approx(r["frames"] / r["stream_s"])
        assert (
            r["denoise_fps"] == pytest.approx(r["frames"] / r["denoise_s"])
            and r["denoise_fps"] > r["end_to_end_fps"]
        )
        for s, d, v, c in zip(pc["seconds"], pc["denoise_s"], pc["decode_s"], pc["cpu_s"]):
            assert 0 < d and 0 < v and c > 0
            # serially a chunk's call holds its denoising and its decode; with the decode overlap (on by
            # default where 2 cores are usable) the call waits for the decode, and its own steps ran in
            # the call before, so only the decode is bound by the call's wall time
            assert v <= s if r.get("overlap") else d + v <= s
        assert r["peak_rss_mib"] > 10
    ratio = report["engine_vs_torch"]["end_to_end_fps"]
    assert ratio == pytest.approx(runs["onnxruntime"]["end_to_end_fps"] / runs["torch"]["end_to_end_fps"])


def test_rf_bench_errors(tmp_path, capsys):
    assert bench_main(["--chunks", "3", "--json", str(tmp_path / "r.json")]) == 2
    assert "nothing to benchmark" in capsys.readouterr().err
    assert bench_main(["--bundle", str(tmp_path / "nope"), "--json", str(tmp_path / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        bench_main(["--model-dir", str(tmp_path), "--chunks", "0", "--json", str(tmp_path / "r.json")]) == 2
    )
    assert "chunks must be an integer >= 1, got 0" in capsys.readouterr().err
    assert bench_main(["--model-dir", str(tmp_path), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        bench_main(["--bundle", str(tmp_path), "--torch-threads", "2", "--json", str(tmp_path / "r.json")])
        == 2
    )
    assert "--torch-threads applies to the torch run" in capsys.readouterr().err
    assert (
        bench_main(["--model-dir", str(tmp_path), "--torch-threads", "0", "--json", str(tmp_path / "r.json")])
        == 2
    )
    assert "threads applies to the torch run and must be >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.json")
