"""``rf-train --set KEY=VALUE``: one config file, its keys changed from the command line (the world
chains' near-copy configs differ only in a few keys). Values are typed by YAML and checked by the
config's own reader; paths are taken from the working directory; bad options get one-line errors."""

import json

import pytest

pytest.importorskip("yaml")

from fault_tools import assert_one_line_error, run_cli  # noqa: E402

from rf_runtime.errors import ConfigError  # noqa: E402
from rf_runtime.train.config import load_config, parse_overrides  # noqa: E402


@pytest.fixture
def files(tiny_model_dir, tmp_path):
    """A config in its own folder (relative paths from there) and a second model directory elsewhere."""
    import shutil

    (tmp_path / "cfg").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "cfg" / "model")
    shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    (tmp_path / "cfg" / "prompts.txt").write_text("a red circle bouncing\n")
    text = "\n".join(
        [
            "teacher: model",
            "student: model",
            "prompts: prompts.txt",
            "output_dir: out",
            "reward: {kind: motion, beta: 0.5, motion: {mean: 0.05, std: 0.02}}",
            "optim: {lr: 2.0e-5, critic_lr: 4.0e-6, ema_start_step: 150}",
            "num_frames: 6",
            "steps: 10",
        ]
    )
    (tmp_path / "cfg" / "run.yaml").write_text(text + "\n")
    return tmp_path


def test_nested_keys_are_merged_and_typed_by_yaml(files):
    sets = ["optim.lr=1e-5", "reward.kind=none", "resolution=[32, 48]", "fold_in_training=true"]
    config = load_config(files / "cfg" / "run.yaml", parse_overrides(sets))
    assert config.optim.lr == 1e-5  # YAML's float, not the string "1e-5"
    assert config.optim.critic_lr == 4e-6 and config.optim.ema_start_step == 150  # the file's siblings kept
    assert config.reward.kind == "none"
    assert config.reward.beta == 0.5 and config.reward.motion.mean == 0.05
    assert tuple(config.resolution) == (32, 48)
    assert config.fold_in_training is True
    assert config.steps == 10 and config.num_frames == 6  # keys not set keep the file's values


def test_paths_are_taken_from_the_working_directory_not_the_config_folder(files, monkeypatch):
    monkeypatch.chdir(files)
    config = load_config(files / "cfg" / "run.yaml", parse_overrides(["student=other-model"]))
    assert config.student == str(files / "other-model")
    assert config.teacher == str(files / "cfg" / "model")  # the file's own paths: from its folder


def test_a_later_option_for_the_same_key_wins(files):
    config = load_config(files / "cfg" / "run.yaml", parse_overrides(["steps=3", "steps=7"]))
    assert config.steps == 7


@pytest.mark.parametrize(
    "item, needles",
    [
        ("optim.lr", ["optim.lr", "KEY=VALUE"]),
        ("=3", ["KEY=VALUE"]),
        ("optim..lr=3", ["KEY=VALUE"]),
        ("resolution=[32,", ["resolution", "not valid YAML"]),
    ],
)
def test_malformed_options_are_refused_by_name(item, needles):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["optim.lrr=1e-5"], ["unknown config key 'optim.lrr'", "critic_lr"]),  # the valid keys are named
        (["steps=many"], ["'steps'", "'many'", "--set"]),
        (["steps.max=3"], ["'steps'", "not a mapping"]),
        (["optim=1", "optim.lr=2"], ["optim"]),
        (["optim.lr=2", "optim=1"], ["optim"]),
    ],
)
def test_keys_and_values_the_config_does_not_take_are_refused_by_name(files, sets, needles):
    with pytest.raises(ConfigError) as info:
        load_config(files / "cfg" / "run.yaml", parse_overrides(sets))
    for needle in needles:
        assert needle in str(info.value)


def test_rf_train_runs_with_the_overrides(files, monkeypatch, capsys):
    """End to end: plain DMD (reward.kind=none) for 2 steps into a folder named on the command line."""
    from rf_runtime.train.cli import main

    monkeypatch.chdir(files)
    argv = ["--config", "cfg/run.yaml", "--quiet", "--set", "reward.kind=none", "--set", "steps=2"]
    argv += ["--set", "batch_size=1", "--set", "cpu_threads=1", "--set", "output_dir=runs/dmd"]
    code, _, err = run_cli(main, argv, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (files / "runs" / "dmd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("reward_mean" not in r for r in records)  # no reward: plain DMD
    assert not (files / "cfg" / "out").exists()  # the file's output_dir was replaced, not also written


def test_rf_train_names_a_bad_option_in_one_line(files, monkeypatch, capsys):
    from rf_runtime.train.cli import main

    monkeypatch.chdir(files)
    code, _, err = run_cli(main, ["--config", "cfg/run.yaml", "--set", "optim.lrr=1"], capsys)
    assert_one_line_error(code, err, "rf-train", "optim.lrr")
    assert not (files / "cfg" / "out").exists()
