"""rf-eval, rf-generate's model choice (--engine, the default bundle), and the ablation command."""

import json
import os

import numpy as np
import pytest

from rf_runtime.cli import eval_main, generate_main
from rf_runtime.errors import ConfigError
from rf_runtime.testing import HEIGHT, WIDTH
from rf_runtime.video import Mp4Writer
from rf_runtime.world import procedural as P


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from rf_runtime.export.bundle_builder import build_bundle

    return build_bundle(model_dir, tmp_path_factory.mktemp("b") / "bundle")


def test_rf_eval_scores_an_mp4_of_a_procedural_video(tmp_path, capsys):
    scene = P.Scene(
        "circle", "red", "small", "fast", "moving right", "black", start=(20.0, 30.0), velocity=(2.2, 0.0)
    )
    path = str(tmp_path / "v.mp4")
    with Mp4Writer(path) as w:
        w.write(P.render(scene, 16 * 4))
    out = str(tmp_path / "m.json")
    assert (
        eval_main([path, "--prompt", "a red circle bouncing", "--json", out, "--segment-seconds", "2"]) == 0
    )
    printed = capsys.readouterr().out
    assert "dynamic degree %" in printed and "prompt adherence %" in printed
    m = json.load(open(out))
    assert m["segments"] == 2 and m["seconds"] == pytest.approx(4.0)
    assert m["dynamic_degree"] == 100.0
    assert m["colour_score"] > 0.9 and m["shape_score"] > 0.9  # through H.264 compression
    # the same video against a wrong prompt
    assert eval_main([path, "--prompt", "a blue square bouncing", "--json", out]) == 0
    assert json.load(open(out))["prompt_adherence"] < 10.0


def test_rf_eval_generates_and_scores_a_stream(model_dir, tmp_path):
    out = str(tmp_path / "m.json")
    assert (
        eval_main(
            [
                "--model-dir",
                model_dir,
                "--prompt",
                "a red circle bouncing",
                "--seconds",
                "2",
                "--segment-seconds",
                "1",
                "--json",
                out,
                "--quiet",
            ]
        )
        == 0
    )
    m = json.load(open(out))
    assert m["seconds"] == pytest.approx(2.0) and m["segments"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.mp4"], "does not exist"),
        ([], "give a video"),
        (["--prompt", "a cube", "--seconds", "-1"], "--seconds"),
        (["--prompt", "a cube", "--json", "/nonexistent-dir/m.json"], "does not exist"),
    ],
)
def test_rf_eval_bad_arguments(args, message, capsys):
    assert eval_main(args) == 2
    assert message in capsys.readouterr().err


def test_rf_generate_runs_an_engine_bundle(bundle, tmp_path):
    from rf_runtime.video import read_mp4

    out = tmp_path / "e.mp4"
    assert (
        generate_main(
            [
                "--engine",
                str(bundle),
                "--prompt",
                "a red circle",
                "--seconds",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_mp4(out).shape == (16, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model-dir", "x"], "two models"),
        (["--height", "64"], "--model-dir models only"),
        (["--dtype", "bfloat16"], "--model-dir models only"),
        (["--ema-alpha", "1.5"], "ema_alpha must be a number in [0, 1]"),
    ],
)
def test_rf_generate_engine_conflicts(bundle, tmp_path, capsys, extra, message):
    argv = [
        "--engine",
        str(bundle),
        "--prompt",
        "a cube",
        "--out",
        str(tmp_path / "c.mp4"),
        "--quiet",
    ] + extra
    if "--model-dir" not in extra:
        argv = argv[2:]  # the default bundle is meant: no --engine either
    assert generate_main(argv) == 2
    assert message in capsys.readouterr().err


def test_bundle_manifest_holds_no_absolute_path(bundle, model_dir):
    text = open(os.path.join(bundle, "manifest.json")).read()
    card = json.loads(text)["model_card"]
    assert card["source"] == os.path.basename(model_dir)
    assert model_dir not in text and str(bundle) not in text


def test_ablation_summary_is_mean_and_standard_error():
    from rf_runtime.world.ablation import Run, markdown_table, summarize

    def run(variant, dd):
        metrics = {
            "dynamic_degree": dd,
            "flow_score": 1.0,
            "travel": 2.0,
            "drift": 0.5,
            "quality_drift": None,
            "subject_consistency": 90.0,
            "prompt_adherence": 50.0,
        }
        return Run("m", variant, "p", 0, metrics, [1.0], 1.0)

    rows = summarize([run("a", 10.0), run("a", 20.0), run("a", 60.0), run("b", 5.0)])
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert rows[0]["dynamic_degree"] == pytest.approx(30.0)
    assert rows[0]["dynamic_degree_se"] == pytest.approx(np.std([10, 20, 60], ddof=1) / np.sqrt(3))
    assert rows[1]["dynamic_degree_se"] is None and rows[0]["quality_drift"] is None
    assert "| m | a | 3 | 30.00 ± 15.28 |" in markdown_table(rows)  # std(10, 20, 60) = 26.46, / sqrt(3)


def test_paired_differences_by_hand():
    from rf_runtime.world.ablation import METRICS, Run, paired_differences, paired_table

    def run(variant, prompt, seed, flow):
        metrics = {m: 0.0 for m in METRICS}
        metrics["flow_score"] = flow
        return Run("m", variant, prompt, seed, metrics, [flow], 1.0)

    # prompt p1 is easy (flow ~10), p2 hard (~1): b is +1, +2, +3 over a on the same (prompt, seed)
    runs = [
        run("a", "p1", 0, 10.0),
        run("a", "p2", 0, 1.0),
        run("a", "p2", 1, 2.0),
        run("b", "p1", 0, 11.0),
        run("b", "p2", 0, 3.0),
        run("b", "p2", 1, 5.0),
        run("b", "p3", 0, 99.0),
    ]
    (row,) = paired_differences(runs)
    assert (row["variant"], row["against"], row["pairs"]) == ("b", "m / a", 3)  # p3 has no partner in a
    assert row["flow_score"] == pytest.approx(2.0)
    assert row["flow_score_se"] == pytest.approx(1.0 / np.sqrt(3))  # std(1, 2, 3) = 1
    assert row["drift"] == 0.0
    assert "| m | b | m / a | 3 | +2.00 ± 0.58 |" in paired_table([row])
    assert paired_differences(runs[:3]) == []  # one group: nothing to compare


def test_ablation_metrics_carry_the_follow_checks_in_percent():
    from rf_runtime.eval import EvalResult
    from rf_runtime.world.ablation import METRICS, detectable, run_metrics

    result = EvalResult(
        seconds=1.0, segments=1, dynamic_degree=50.0, flow_score=1.5, drift=2.0, subject_consistency=90.0
    )
    result.prompt_following = {
        "follow": {"colour": 0.25, "background": 1.0, "shape": 0.5, "one_object": 0.75, "motion_ok": True}
    }
    m = run_metrics(result)
    assert set(m) == set(METRICS)
    assert (m["colour"], m["background"], m["shape"], m["one_object"], m["motion_ok"]) == (
        25.0,
        100.0,
        50.0,
        75.0,
        100.0,
    )
    assert (m["flow_score"], m["drift"], m["prompt_adherence"]) == (1.5, 2.0, None)
    result.prompt_following = {}  # not a prompt of the world: no follow checks, not zeros
    assert run_metrics(result)["colour"] is None
    assert detectable(0.5) == pytest.approx((1.96 + 0.84) * 0.5) and detectable(None) is None


def test_ablation_command_writes_table_and_plots(model_dir, tmp_path, capsys):
    from rf_runtime.world.cli import main

    out = tmp_path / "abl"
    assert (
        main(
            [
                "--quiet",
                "ablate",
                "--model",
                f"tiny={model_dir}",
                "--variants",
                "no sink,EMA-Sink a=0.99",
                "--prompt",
                "a red circle bouncing",
                "--seeds",
                "1",
                "--seconds",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(os.listdir(out)) == [
        "ablation.json",
        "ablation.md",
        "ablation_metrics.png",
        "ablation_motion_over_time.png",
    ]
    data = json.load(open(out / "ablation.json"))
    assert [r["variant"] for r in data["summary"]] == ["no sink", "EMA-Sink a=0.99"]
    assert data["command"].startswith("rf-world --quiet ablate")
    assert [r["variant"] for r in data["paired"]] == ["EMA-Sink a=0.99"] and data["paired"][0]["pairs"] == 1
    md = open(out / "ablation.md").read()
    assert "paired by prompt and seed" in md and "80 % power" in md and "colour %" in md
    assert data["paired"][0]["colour_detectable"] is None  # one pair: no standard error, nothing claimed
    assert main(["ablate", "--model", "nodir", "--out", str(out)]) == 2
    assert "--model 'nodir': write it as NAME=DIR" in capsys.readouterr().err
    assert main(["ablate", "--model", f"x={model_dir}", "--engine", "=engines/x", "--out", str(out)]) == 2
    assert "--engine '=engines/x': write it as NAME=BUNDLE" in capsys.readouterr().err
    assert (
        main(["ablate", "--model", f"x={model_dir}@{tmp_path}/missing.safetensors", "--out", str(out)]) == 2
    )
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert main(["ablate", "--model", f"x={model_dir}", "--variants", "huge sink", "--out", str(out)]) == 2
    assert "unknown cache variants" in capsys.readouterr().err


def test_ablation_reuses_the_runs_of_an_earlier_one(model_dir, tmp_path, capsys):
    """--reuse: a second model added to an earlier grid streams only its own runs; the earlier runs come
    back unchanged (their generation times too, which a new stream would not repeat), and a model under
    the same name that is now another directory, or streams of another length, are refused."""
    import shutil

    from fault_tools import assert_one_line_error, run_cli

    from rf_runtime.world.cli import main

    twin = tmp_path / "twin"
    shutil.copytree(model_dir, twin)  # the same weights: its runs must equal the reused ones
    grid = [
        "--variants",
        "static sink",
        "--prompt",
        "a red circle bouncing",
        "--seeds",
        "2",
        "--seconds",
        "1",
    ]
    first = tmp_path / "first"
    assert main(["--quiet", "ablate", "--model", f"a={model_dir}", *grid, "--out", str(first)]) == 0
    earlier = json.load(open(first / "ablation.json"))
    second = tmp_path / "second"
    argv = ["--quiet", "ablate", "--model", f"a={model_dir}", "--model", f"b={twin}", *grid]
    assert main([*argv, "--reuse", str(first / "ablation.json"), "--out", str(second)]) == 0
    data = json.load(open(second / "ablation.json"))
    assert [(r["model"], r["seed"]) for r in data["runs"]] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert data["runs"][:2] == earlier["runs"]  # taken as they were, seconds_to_generate included
    for a, b in zip(data["runs"][:2], data["runs"][2:]):
        assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-6, abs=1e-9)  # streamed anew: same frames
        assert b["seconds_to_generate"] != a["seconds_to_generate"]
    assert data["reused_from"]["runs"] == 2 and data["reused_from"]["command"] == earlier["command"]
    assert "2 of the 4 runs were taken from" in open(second / "ablation.md").read()
    assert data["paired"][0]["pairs"] == 2 and data["paired"][0]["colour"] == pytest.approx(0.0, abs=1e-9)

    bad = [
        (["--model", f"a={twin}", *grid], ["model 'a'", "another name"]),
        (["--model", f"a={model_dir}", *grid[:-1], "2"], ["1 s long", "--seconds 1"]),
    ]
    for options, needles in bad:
        reuse = ["--reuse", str(first / "ablation.json"), "--out", str(tmp_path / "x")]
        code, _, err = run_cli(main, ["ablate", *options, *reuse], capsys)
        assert_one_line_error(code, err, "rf-world", *needles)
    (tmp_path / "not.json").write_text("{}")
    for path, needle in [(tmp_path / "none.json", "does not exist"), (tmp_path / "not.json", "KeyError")]:
        code, _, err = run_cli(
            main, ["ablate", "--model", f"a={model_dir}", "--reuse", path, "--out", tmp_path / "x"], capsys
        )
        assert_one_line_error(code, err, "rf-world", needle)
    assert not (tmp_path / "x").exists()  # refused before anything was streamed or written


def test_ablation_in_worker_processes_gives_the_same_runs(model_dir):
    from rf_runtime.world.ablation import CACHE_VARIANTS, run_ablation

    args = (
        {"tiny": model_dir},
        {v: CACHE_VARIANTS[v] for v in ("no sink", "static sink")},
        ["a red circle bouncing"],
        [0],
        3.0,
    )  # 4+ chunks: past the sink and window, where they differ
    here, workers = run_ablation(*args), run_ablation(*args, jobs=2)
    # equal up to float summation order (the workers run one torch thread, this process may run more)
    assert [r.variant for r in workers] == [r.variant for r in here]
    for a, b in zip(workers, here):
        assert a.metrics == pytest.approx(b.metrics, rel=1e-3, abs=1e-3)
    assert here[0].metrics != here[1].metrics  # the variants differ, so the comparison above means something
    with pytest.raises(ConfigError, match="jobs"):
        run_ablation(*args, jobs=0)


def test_ablation_through_the_bundle_gives_the_model_directorys_runs(engine_dirs):
    """Rate-only variants stream through the exported bundle, the no-sink variant through the model
    directory; the metrics equal those of the model directory alone (frames agree to a uint8 level)."""
    from rf_runtime.world import ablation as A

    model, bundle = engine_dirs
    args = (
        {"m": str(model)},
        {v: A.CACHE_VARIANTS[v] for v in ("static sink", "EMA-Sink a=0.99", "no sink")},
        ["a red circle bouncing"],
        [0],
        3.0,
    )
    direct, through = A.run_ablation(*args), A.run_ablation(*args, engines={"m": str(bundle)})
    for a, b in zip(through, direct):
        assert a.variant == b.variant
        assert a.metrics == pytest.approx(b.metrics, rel=0.02, abs=0.5)  # metrics of frames a level apart
    assert A._streamer(str(model), A.CACHE_VARIANTS["static sink"], str(bundle)).source == "engine bundle"
    assert A._streamer(str(model), A.CACHE_VARIANTS["no sink"], str(bundle)).source != "engine bundle"
    with pytest.raises(ConfigError, match="names no model"):
        A.run_ablation(*args, engines={"other": str(bundle)})
    with pytest.raises(ConfigError, match="not an engine bundle"):
        A.run_ablation(*args, engines={"m": str(model)})


def test_rf_generate_without_a_model_runs_the_shipped_bundle_and_the_shape_moves(tmp_path):
    pytest.importorskip("onnxruntime")
    from rf_runtime.bundle import DEFAULT_ENGINE, Bundle, default_engine_dir
    from rf_runtime.world.adherence import evaluate  # the metrics with the procedural world's adherence
    from rf_runtime.video import read_mp4

    path = default_engine_dir()
    assert os.path.basename(path) == DEFAULT_ENGINE
    bundle = Bundle.load(path)  # hashes verified
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 50 * 2**20  # a few MB, shipped in git

    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        if isinstance(x, list):
            return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []

    assert not [
        s for s in strings(bundle.manifest) if os.path.isabs(s)
    ]  # no path of the machine that built it
    assert bundle.manifest["text_encoder"]["kind"] == "hashed"

    out = tmp_path / "ball.mp4"
    assert (
        generate_main(["--prompt", "a red circle bouncing", "--seconds", "4", "--out", str(out), "--quiet"])
        == 0
    )
    frames = read_mp4(out)
    assert frames.shape == (64, 64, 64, 3)
    result = evaluate(frames, "a red circle bouncing", segment_seconds=2)
    # something moves in every 2 s segment (VBench rule, threshold 1.5 px at 64 px) ...
    assert result.dynamic_degree == 100.0 and result.flow_score > 1.5
    # ... and it is a foreground object on the prompt's (black) background, not noise
    assert result.shape_score > 0.5
    # it goes somewhere (the first model wobbled in place: 7.5 px over 30 s), and its colour is the
    # prompt's red (the second model's was orange-red, 0.38); measured 18.5 px and 0.96 for this bundle
    assert result.travel > 8.0
    assert result.colour_score > 0.8


@pytest.mark.parametrize(
    "prompt, colour_at_least, background_at_least",
    [("a red circle bouncing", 0.9, 0.8), ("a green circle moving up on a white background", 0.75, 0.9)],
)
def test_the_shipped_bundle_follows_two_prompts_as_far_as_measured(
    prompt, colour_at_least, background_at_least
):
    # Issue 16's prompt-following checks (rf_runtime.world.follow) on 4 s of the default model, as a
    # regression guard at the levels it reaches (docs/notes/world.md, tenth session; measured on these
    # 64 frames: colour 1.00 and 0.83, background 0.91 and 0.98, shape 1.00 and 0.83, one object 1.00
    # and 0.98; with the vae9 decoder the red circle's background was 0.86): the prompt's background (white too), one object of the prompt's colour and shape. It
    # does not reach all of the targets (motion along the prompted axis, >= 90 % colour over the
    # held-out prompts): those are reported, not asserted.
    pytest.importorskip("onnxruntime")
    from rf_runtime.streamer import Streamer
    from rf_runtime.world.follow import score_prompt

    streamer = Streamer.from_engine()
    frames = np.concatenate(list(streamer.stream(prompt, seed=0, num_frames=64)))
    f = score_prompt(frames, prompt)
    assert f.background >= background_at_least and f.one_object >= 0.9
    assert f.colour >= colour_at_least and f.colour_changes == 0
    assert f.shape >= 0.8  # circles: fill ratio nearest pi/4
    assert set(P.VOCABULARY) <= set(streamer.backend.model_card.vocabulary)  # the card lists what it knows


def test_rf_world_sheet_writes_one_row_per_prompt(bundle, tmp_path):
    import matplotlib.image

    from rf_runtime.world.cli import main

    out = str(tmp_path / "sheet.png")
    assert (
        main(
            [
                "sheet",
                "--engine",
                str(bundle),
                "--prompt",
                "a red circle bouncing",
                "--prompt",
                "a blue square moving left",
                "--seconds",
                "1",
                "--columns",
                "3",
                "--out",
                out,
            ]
        )
        == 0
    )
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > image.shape[0]  # 2 rows of 3 frames: wider than tall
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left
