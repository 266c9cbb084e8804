"""Fault suite, training: a signal in any phase of a step stops at the step boundary and resumes bit for
bit; configs that are not mappings; checkpoints that are directories or hold NaN; --steps 0; full and
read-only disks."""

import json
import os
import signal

import pytest

torch = pytest.importorskip("torch")

from fault_tools import assert_one_line_error, fill, run_cli, tmpfs  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from rf_runtime.errors import CheckpointError  # noqa: E402
from rf_runtime.train.cli import main as train_main  # noqa: E402
from rf_runtime.train.trainer import Trainer, latest_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle bouncing\na blue square sliding\n")
    return path


def write_config(folder, model_dir, prompts, out, **over):
    raw = dict(
        teacher=str(model_dir),
        prompts=str(prompts),
        output_dir=str(out),
        negative_prompt="static",
        reward=dict(kind="motion", beta=0.5, normalize=True, motion=dict(mean=0.05, std=0.02)),
        num_frames=6,
        batch_size=2,
        steps=5,
        seed=0,
        checkpoint_every=100,
        cpu_threads=1,
        optim=dict(lr=1e-4, critic_lr=1e-3, critic_updates_per_generator=2, ema_start_step=0),
    )
    raw.update(over)
    path = folder / f"config-{len(os.listdir(folder))}.json"
    path.write_text(json.dumps(raw))
    return path


def final_state(out):
    return load_file(latest_checkpoint(str(out)))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts, tmp_path_factory):
    """The uninterrupted run: 5 steps (generator updates at steps 0, 2, 4), one checkpoint at the end."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder, tiny_model_dir, prompts, folder / "out")
    torch.manual_seed(0)  # the process-wide RNG a checkpoint stores: as a fresh process starts it
    assert train_main(["--config", str(cfg), "--quiet"]) == 0
    return final_state(folder / "out")


STEP = 2  # the third step: a generator update, EMA and a critic update


def _after(method, when):
    real = getattr(Trainer, method)

    def wrapped(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if when(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    return method, wrapped


PHASES = {
    # right after the generator's AdamW step, before its EMA and the step counter (where a raw interrupt
    # used to save a state whose update a resume then applied a second time)
    "generator update": _after(
        "_clip_and_step", lambda self, params, opt: self.step == STEP and opt is self.gen_opt
    ),
    "EMA": _after("_update_ema", lambda self: self.step == STEP),
    "critic update": _after(
        "_clip_and_step", lambda self, params, opt: self.step == STEP and opt is self.critic_opt
    ),
    "logging": _after("train_step", lambda self: self.step == STEP + 1),  # counter moved, log not yet written
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_any_phase_stops_at_the_step_boundary_and_resumes_bit_exactly(
    phase, reference, tiny_model_dir, prompts, sandbox, monkeypatch, capsys
):
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out")
    method, wrapped = PHASES[phase]
    with monkeypatch.context() as m:
        m.setattr(Trainer, method, wrapped)
        torch.manual_seed(0)
        code, _, err = run_cli(train_main, ["--config", cfg, "--quiet"], capsys)
    assert code == 130 and "stopped after step 3" in err and "Traceback" not in err, err
    assert os.path.basename(latest_checkpoint(str(sandbox.work / "out"))) == "checkpoint_000003.safetensors"
    torch.manual_seed(123)  # the resume restores the RNG from the checkpoint
    code, _, err = run_cli(train_main, ["--config", cfg, "--resume", "--quiet"], capsys)
    assert code == 0, err
    got = final_state(sandbox.work / "out")
    assert sorted(got) == sorted(reference)
    differ = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not differ, (
        f"{len(differ)} of {len(reference)} tensors differ from the uninterrupted run: {differ[:3]}"
    )


def test_a_signal_during_a_checkpoint_save_waits_for_it(
    reference, tiny_model_dir, prompts, sandbox, monkeypatch, capsys
):
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out", checkpoint_every=3)
    real = Trainer.save_checkpoint

    def save_with_signal(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save_checkpoint", save_with_signal)
        torch.manual_seed(0)
        code, _, err = run_cli(train_main, ["--config", cfg, "--quiet"], capsys)
    assert code == 130 and "stopped after step 3" in err
    assert sorted(os.listdir(sandbox.work / "out")) == ["checkpoint_000003.safetensors", "log.jsonl"]
    assert run_cli(train_main, ["--config", cfg, "--resume", "--quiet"], capsys)[0] == 0
    got = final_state(sandbox.work / "out")
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_a_second_signal_interrupts_without_saving_half_a_step(
    tiny_model_dir, prompts, sandbox, monkeypatch, capsys
):
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out", checkpoint_every=2)
    real = Trainer.critic_step

    def twice(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "critic_step", twice)
        code, _, err = run_cli(train_main, ["--config", cfg, "--quiet"], capsys)
    assert code == 130 and "interrupted again during step 3: that step was not saved" in err
    assert os.path.basename(latest_checkpoint(str(sandbox.work / "out"))) == "checkpoint_000002.safetensors"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- teacher: a\n- prompts: b\n", "holds a list"),
        ("just words\n", "holds a str"),
        ("[1, 2]\n", "holds a list"),
    ],
)
def test_a_config_that_is_not_a_mapping(sandbox, capsys, text, needle):
    (sandbox.work / "c.yaml").write_text(text)
    code, _, err = run_cli(train_main, ["--config", "c.yaml"], capsys)
    assert_one_line_error(code, err, "rf-train", "c.yaml", needle, "key: value")


def test_a_config_that_is_a_directory(sandbox, capsys):
    os.mkdir("c.yaml")
    code, _, err = run_cli(train_main, ["--config", "c.yaml"], capsys)
    assert_one_line_error(code, err, "rf-train", "c.yaml", "is a directory")


def test_steps_zero_writes_nothing_and_says_so(tiny_model_dir, prompts, sandbox, capsys):
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out")
    code, _, err = run_cli(train_main, ["--config", cfg, "--steps", "0", "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-train", "nothing to train", "no checkpoint was written")
    assert latest_checkpoint(str(sandbox.work / "out")) is None


def test_resume_from_a_directory(tiny_model_dir, prompts, sandbox, capsys):
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out")
    os.mkdir("ckpt")
    code, _, err = run_cli(train_main, ["--config", cfg, "--resume", "ckpt", "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-train", "ckpt is a directory")


@pytest.fixture
def nan_checkpoint(reference, sandbox):
    bad = {k: v.clone() for k, v in reference.items()}
    key = next(k for k in bad if k.startswith("generator_ema.") and bad[k].is_floating_point())
    bad[key].view(-1)[0] = float("nan")
    path = sandbox.work / "nan.safetensors"
    save_file(
        bad,
        str(path),
        metadata={"format": "rf_runtime.train/1", "step": "5", "config": "{}", "world_size": "1"},
    )
    return path, key


def test_resume_refuses_nan_weights(nan_checkpoint, tiny_model_dir, prompts, sandbox, capsys):
    path, key = nan_checkpoint
    cfg = write_config(sandbox.work, tiny_model_dir, prompts, sandbox.work / "out", steps=6)
    code, _, err = run_cli(train_main, ["--config", cfg, "--resume", path, "--quiet"], capsys)
    assert_one_line_error(code, err, "rf-train", key, "NaN or infinite", "earlier checkpoint")


def test_streaming_refuses_nan_weights(nan_checkpoint, tiny_model_dir, sandbox):
    from rf_runtime import Streamer

    path, key = nan_checkpoint
    with pytest.raises(CheckpointError, match=rf"{key}.*NaN or infinite"):
        Streamer.from_checkpoint(tiny_model_dir, path)


def test_generate_refuses_nan_weights_in_one_line(nan_checkpoint, tiny_model_dir, sandbox, capsys):
    from rf_runtime.cli import generate_main

    path, key = nan_checkpoint
    code, _, err = run_cli(
        generate_main,
        [
            "--model-dir",
            tiny_model_dir,
            "--checkpoint",
            path,
            "--prompt",
            "a cat",
            "--out",
            "v.mp4",
            "--quiet",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "rf-generate", "NaN or infinite")
    assert not os.path.exists("v.mp4")


def test_generate_with_a_checkpoint_directory_that_is_not_a_model(tiny_model_dir, sandbox, capsys):
    os.mkdir("weights")
    from rf_runtime.cli import generate_main

    code, _, err = run_cli(
        generate_main,
        [
            "--model-dir",
            tiny_model_dir,
            "--checkpoint",
            "weights",
            "--prompt",
            "a cat",
            "--out",
            "v.mp4",
            "--quiet",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "rf-generate", "weights is a directory")


def test_training_onto_a_read_only_disk(tiny_model_dir, prompts, sandbox, capsys):
    with tmpfs(sandbox.work / "ro", ro=True) as ro:
        cfg = write_config(sandbox.work, tiny_model_dir, prompts, ro / "out")
        code, _, err = run_cli(train_main, ["--config", cfg, "--quiet"], capsys)
        assert_one_line_error(code, err, "rf-train", "output_dir", "read-only file system")


def test_training_onto_a_full_disk(tiny_model_dir, prompts, sandbox, capsys):
    with tmpfs(sandbox.work / "full", size="1m") as full:
        cfg = write_config(sandbox.work, tiny_model_dir, prompts, full / "out", steps=2)
        fill(full, leave=4096)
        code, _, err = run_cli(train_main, ["--config", cfg, "--quiet"], capsys)
        assert_one_line_error(code, err, "rf-train", "no space left on device")
        left = os.listdir(full / "out") if (full / "out").exists() else []
        assert not [n for n in left if n.endswith(".safetensors") or n.startswith(".checkpoint")], left
