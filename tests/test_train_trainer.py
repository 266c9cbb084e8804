"""rf-train end to end on a tiny random model: config errors, learning, resume, checkpoints, gloo."""

import json
import os

import pytest
import torch

from rf_runtime.errors import ConfigError
from rf_runtime.train.config import config_from_dict, load_config
from rf_runtime.train.trainer import Trainer, latest_checkpoint


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle bouncing\na blue square sliding\n\na green ball rolling\n")
    return path


def raw_config(model_dir, prompt_file, out, /, **over):
    raw = dict(
        teacher=str(model_dir),
        prompts=str(prompt_file),
        output_dir=str(out),
        negative_prompt="static blurry",
        reward=dict(kind="motion", beta=0.5, normalize=True, motion=dict(mean=0.05, std=0.02)),
        num_frames=6,
        batch_size=2,
        steps=4,
        seed=0,
        checkpoint_every=100,
        optim=dict(lr=1e-4, critic_lr=1e-3, critic_updates_per_generator=2, ema_start_step=0),
        fold_in_training=True,
    )
    raw.update(over)
    return raw


def make(model_dir, prompt_file, out, /, **over):
    return Trainer(config_from_dict(raw_config(model_dir, prompt_file, out, **over)))


# ---- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(learning_rate=1e-3), "unknown config key 'learning_rate'.*valid keys"),
        (
            dict(reward=dict(kind="motion", bta=1.0)),
            "unknown config key 'reward.bta'.*valid keys under reward",
        ),
        (dict(steps="ten"), "'steps' must be an integer, got 'ten'"),
        (dict(optim=dict(lr="fast")), "'optim.lr' must be a number, got 'fast'"),
        (dict(batch_size=2.5), "'batch_size' must be an integer"),
        (dict(fold_in_training="yes"), "'fold_in_training' must be true or false"),
        (dict(optim=dict(betas=[0.9])), "'optim.betas' must be a list of 2 values"),
        (dict(teacher="/nonexistent/teacher"), "'teacher'.*not a model directory.*rf_runtime.testing"),
        (
            dict(reward=dict(kind="clip")),
            "'reward.kind' is invalid: it must be 'videoalign', 'motion' or 'none'",
        ),
        (dict(reward=dict(kind="videoalign")), "reward.videoalign.model_dir is not set"),
        (dict(prompts="/nonexistent/prompts.txt"), "'prompts'.*does not exist"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(model_dir, prompts, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw_config(model_dir, prompts, tmp_path, **change))


def test_missing_teacher_key_and_cli_errors(model_dir, prompts, tmp_path, capsys):
    raw = raw_config(model_dir, prompts, tmp_path)
    del raw["teacher"]
    with pytest.raises(ConfigError, match="'teacher' is required"):
        config_from_dict(raw)
    from rf_runtime.train.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: nowhere\nprompts: p.txt\noutput_dir: out\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rf-train: error: config key 'teacher'" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(ConfigError, match="multiple of chunk_frames"):
        make(model_dir, prompts, tmp_path, num_frames=7)
    cfg = make(model_dir, prompts, tmp_path, batch_size=3).config  # a valid config with an odd batch
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        from rf_runtime.train.distributed import DistContext

        Trainer(cfg, DistContext(0, 2))


def test_yaml_paths_are_relative_to_the_file(model_dir, prompts, tmp_path):
    os.symlink(model_dir, tmp_path / "teacher")
    (tmp_path / "p.txt").write_text(prompts.read_text())
    (tmp_path / "c.yaml").write_text(
        "teacher: teacher\nprompts: p.txt\noutput_dir: runs/x\nreward: {kind: none}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(
        "teacher: teacher\nprompts: p.txt\noutput_dir: o\noptim: {lr: 1e-4}\nreward: {kind: none}\n"
    )
    assert load_config(tmp_path / "d.yaml").optim.lr == 1e-4  # YAML gives the string '1e-4' here
    assert cfg.teacher == str(tmp_path / "teacher") and cfg.output_dir == str(tmp_path / "runs" / "x")
    assert (cfg.optim.lr, cfg.optim.critic_lr, cfg.optim.betas, cfg.optim.weight_decay) == (
        2e-6,
        4e-7,
        (0.0, 0.999),
        0.01,
    )
    assert (cfg.optim.grad_clip, cfg.optim.critic_updates_per_generator, cfg.optim.ema_weight) == (
        10.0,
        5,
        0.99,
    )
    assert (cfg.optim.ema_start_step, cfg.batch_size, cfg.num_frames, cfg.reward.beta) == (200, 1, 21, 0.5)
    assert (cfg.dmd.guidance_scale, cfg.dmd.timestep_shift, cfg.dmd.min_timestep, cfg.dmd.max_timestep) == (
        3.0,
        5.0,
        20.0,
        980.0,
    )


# ---- training --------------------------------------------------------------------------------


def test_a_few_steps_lower_the_critic_loss(model_dir, prompts, tmp_path):
    # a high critic learning rate so that 8 updates show; the critic loss has a floor well above 0
    # (flow matching against random noise), measured here: 2.74 -> 2.30
    trainer = make(
        model_dir,
        prompts,
        tmp_path,
        steps=8,
        optim=dict(lr=1e-4, critic_lr=1e-2, critic_updates_per_generator=2),
    )
    before = trainer.evaluate_critic()
    logs = [rec.values for rec in trainer.train()]
    after = trainer.evaluate_critic()
    assert after < 0.9 * before, (before, after)
    gen = [v for v in logs if "generator_loss" in v]
    assert len(gen) == 4 and len(logs) == 8  # one generator update every 2 steps, a critic update every step
    for key in ("reward_mean", "reward_std", "reward_min", "reward_max", "weight_mean", "dmd_grad_abs_mean"):
        assert all(key in v for v in gen), key
    assert all(abs(v["weight_mean"] - 1.0) < 1e-6 for v in gen)  # batch-normalised Z
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_generator_ema_follows_the_update_rule(model_dir, prompts, tmp_path):
    trainer = make(
        model_dir,
        prompts,
        tmp_path,
        steps=1,
        optim=dict(ema_weight=0.9, ema_start_step=0, critic_updates_per_generator=1),
    )
    before = [p.detach().clone() for _, p in trainer.gen_params]
    list(trainer.train())
    for e, b, (n, p) in zip(trainer.ema, before, trainer.gen_params):
        assert torch.allclose(e, 0.9 * b + 0.1 * p.detach(), atol=1e-7), n
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, trainer.gen_params))


def test_activation_checkpointing_gives_the_same_training(model_dir, prompts, tmp_path):
    plain = make(model_dir, prompts, tmp_path / "a", steps=2)
    ckpt = make(model_dir, prompts, tmp_path / "b", steps=2, activation_checkpointing=True)
    list(plain.train())
    list(ckpt.train())
    a, b = plain.state_tensors(), ckpt.state_tensors()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-8), key
    assert set(dict(ckpt.student.named_parameters())) == set(dict(plain.student.named_parameters()))


def test_gradient_accumulation_matches_the_whole_batch(model_dir, prompts, tmp_path, monkeypatch):
    """Micro-batches of 1 accumulate to the batch-of-2 gradients of the generator and the critic
    (Z = 1; with reward.normalize the batch-mean Z is taken per micro-batch, so there it differs by
    design). Compared before the AdamW step, which would magnify rounding on near-zero gradients."""
    seen = []
    real = Trainer._clip_and_step

    def record(self, params, opt):
        seen.append({n: p.grad.clone() for n, p in params})
        return real(self, params, opt)

    monkeypatch.setattr(Trainer, "_clip_and_step", record)
    reward = dict(kind="motion", beta=0.5, normalize=False, motion=dict(mean=0.0077, std=0.01))
    logs = []
    for out, micro in (("a", None), ("b", 1)):
        trainer = make(model_dir, prompts, tmp_path / out, steps=1, reward=reward, micro_batch_size=micro)
        logs.append(next(iter(trainer.train())).values)
    whole_gen, whole_critic, micro_gen, micro_critic = seen
    for whole, acc in ((whole_gen, micro_gen), (whole_critic, micro_critic)):
        scale = max(g.abs().max() for g in whole.values())
        for n in whole:
            assert torch.allclose(whole[n], acc[n], rtol=1e-4, atol=1e-6 * scale), n
    for key in ("generator_loss", "critic_loss", "reward_mean", "reward_max"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key
    with pytest.raises(ConfigError, match="micro_batch_size"):
        make(model_dir, prompts, tmp_path / "c", micro_batch_size=3)


def test_only_the_newest_checkpoints_are_kept(model_dir, prompts, tmp_path):
    trainer = make(model_dir, prompts, tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=2)
    written = []
    list(trainer.train(on_checkpoint=written.append))
    assert [os.path.basename(p) for p in written] == [f"checkpoint_00000{i}.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint_000002.safetensors",
        "checkpoint_000003.safetensors",
        "log.jsonl",
    ]


def test_resume_after_interruption_is_bit_exact(model_dir, prompts, tmp_path):
    full = make(model_dir, prompts, tmp_path / "full", steps=5)
    list(full.train())
    first = make(model_dir, prompts, tmp_path / "split", steps=5)
    list(first.train(steps=2))  # "interrupted" after step 2 (a checkpoint is written at the end of train())
    path = latest_checkpoint(str(tmp_path / "split"))
    assert path.endswith("checkpoint_000002.safetensors")
    resumed = make(model_dir, prompts, tmp_path / "split", steps=5)
    resumed.load_checkpoint(path)
    assert resumed.step == 2
    list(resumed.train())
    a, b = full.state_tensors(), resumed.state_tensors()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(k.startswith("optim.critic.") and k.endswith("exp_avg_sq") for k in a)
    from rf_runtime.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not an rf-train checkpoint.*student_checkpoint"):
        resumed.load_checkpoint(str(model_dir / "diffusion_pytorch_model.safetensors"))


def test_reward_none_is_plain_dmd_and_a_custom_reward_plugs_in(model_dir, prompts, tmp_path):
    from rf_runtime.train.rewards import RewardModel

    plain = make(model_dir, prompts, tmp_path / "a", steps=1, reward=dict(kind="none"))
    values = next(iter(plain.train())).values
    assert "generator_loss" in values and "reward_mean" not in values
    assert values["generator_loss"] == pytest.approx(values["dmd_loss"], rel=1e-12)

    class Brightness(RewardModel):  # the interface a user implements for their own reward
        def score(self, frames, prompts):
            return frames.mean(dim=(1, 2, 3, 4))

    cfg = config_from_dict(
        raw_config(
            model_dir, prompts, tmp_path / "b", steps=1, reward=dict(kind="none", beta=0.5, normalize=False)
        )
    )
    custom = Trainer(cfg, reward_model=Brightness())
    values = next(iter(custom.train())).values
    # Z = 1: the generator loss is the DMD loss weighted by exp(2 r) per sample, r in [0, 1]
    assert 0.0 < values["reward_mean"] < 1.0
    assert values["generator_loss"] > values["dmd_loss"]


def test_checkpoint_loads_into_streamer_and_exporter(model_dir, prompts, tmp_path):
    from safetensors.torch import load_file

    from rf_runtime import Streamer

    trainer = make(model_dir, prompts, tmp_path, steps=1)
    list(trainer.train())
    path = latest_checkpoint(str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    saved = load_file(path)
    streamer = Streamer.from_checkpoint(model_dir, path)
    dit = streamer.backend.dit
    assert torch.equal(dit.head.head.weight, saved["generator_ema.head.head.weight"])
    raw = Streamer.from_checkpoint(model_dir, path, use_ema=False).backend.dit
    assert torch.equal(raw.blocks[1].ffn[0].weight, saved["generator.blocks.1.ffn.0.weight"])
    assert not torch.equal(saved["generator.head.head.weight"], saved["generator_ema.head.head.weight"])
    frames = list(streamer.stream("a red circle bouncing", num_frames=9))
    assert frames[0].shape[0] == 9
    from rf_runtime.export.bundle_builder import build_bundle

    bundle = build_bundle(model_dir, tmp_path / "bundle", checkpoint=path)
    manifest = json.loads(open(os.path.join(bundle, "manifest.json")).read())
    assert manifest["model_card"]["checkpoint"] == os.path.basename(path)  # no machine paths in a bundle


def test_reward_statistics_for_normalisation(model_dir, prompts, tmp_path, capsys):
    raw_reward = dict(kind="motion", motion=dict(mean=0.0, std=1.0))
    stats = make(model_dir, prompts, tmp_path, reward=raw_reward).reward_statistics(batches=2)
    assert stats["samples"] == 4 and stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] > 0
    shifted = make(model_dir, prompts, tmp_path, reward=dict(kind="motion", motion=dict(mean=0.01, std=0.5)))
    again = shifted.reward_statistics(batches=2)  # the same samples, normalised: (r - 0.01) / 0.5
    assert again["mean"] == pytest.approx((stats["mean"] - 0.01) / 0.5, rel=1e-6)
    assert again["std"] == pytest.approx(stats["std"] / 0.5, rel=1e-5)
    from rf_runtime.train.cli import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(raw_config(model_dir, prompts, tmp_path / "out", reward=raw_reward)))
    assert main(["--config", str(cfg), "--measure-reward", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mean"] == pytest.approx(stats["mean"]) and not (tmp_path / "out").exists()


def test_cli_trains_and_resumes(model_dir, prompts, tmp_path):
    from rf_runtime.train.cli import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(raw_config(model_dir, prompts, tmp_path / "out", steps=3)))
    assert main(["--config", str(cfg), "--steps", "2", "--quiet"]) == 0
    assert latest_checkpoint(str(tmp_path / "out")).endswith("_000002.safetensors")
    assert main(["--config", str(cfg), "--resume", "--quiet"]) == 0
    assert latest_checkpoint(str(tmp_path / "out")).endswith("_000003.safetensors")
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert main(["--config", str(cfg), "--resume", str(tmp_path / "nope.safetensors"), "--quiet"]) == 2


def test_cli_refuses_a_fresh_run_over_another_and_bad_output_dirs(model_dir, prompts, tmp_path, capsys):
    """Starting again without --resume in a folder that holds a run would overwrite some of its checkpoints
    and interleave the logs; an output_dir that cannot be written fails before any work, in one line."""
    from rf_runtime.train.cli import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(raw_config(model_dir, prompts, tmp_path / "out", steps=1)))
    assert main(["--config", str(cfg), "--quiet"]) == 0
    before = sorted(os.listdir(tmp_path / "out")), (tmp_path / "out" / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint_000001.safetensors)" in err and "--resume" in err
    assert (sorted(os.listdir(tmp_path / "out")), (tmp_path / "out" / "log.jsonl").read_text()) == before
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "out2"), "--quiet"]) == 0
    (tmp_path / "file").write_text("x")  # a file where a folder is needed: no user can create it
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "file" / "run"), "--quiet"]) == 2
    assert "cannot create output_dir" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unreadable_checkpoint_is_one_line(model_dir, prompts, tmp_path, capsys):
    """A file that is not a checkpoint: a CheckpointError in one line, not torch's or safetensors' traceback."""
    from rf_runtime.errors import CheckpointError
    from rf_runtime.models.dit import load_checkpoint_file
    from rf_runtime.train.cli import main

    for name in ("junk.safetensors", "junk.pt"):
        (tmp_path / name).write_bytes(b"{not a checkpoint}" * 10)
        with pytest.raises(CheckpointError, match=f"could not read checkpoint .*{name}") as err:
            load_checkpoint_file(tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(raw_config(model_dir, prompts, tmp_path / "out", steps=1)))
    assert main(["--config", str(cfg), "--resume", str(tmp_path / "junk.safetensors"), "--quiet"]) == 2
    assert "could not read" in capsys.readouterr().err


def test_cli_ctrl_c_saves_a_checkpoint(model_dir, prompts, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2 (self.step == 1): the step completes, then a checkpoint at step 2 (the signal acts
    at the step boundary; tests/test_faults_train.py covers every phase of a step and the bit-exact resume)."""
    import signal

    from rf_runtime.train.cli import main

    real_step = Trainer.train_step

    def interrupt_during_step(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupt_during_step)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(raw_config(model_dir, prompts, tmp_path / "out", steps=3)))
    assert main(["--config", str(cfg), "--quiet"]) == 130
    assert latest_checkpoint(str(tmp_path / "out")).endswith("_000002.safetensors")
    assert "stopped after step 2" in capsys.readouterr().err


# ---- two processes over gloo -----------------------------------------------------------------


def _worker(rank, world, init_file, raw, out_path):
    import torch.distributed as dist

    from rf_runtime.train.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, torch.device("cpu"))
        first = Trainer(config_from_dict(raw), ctx)
        list(first.train(steps=2))  # interrupted after step 2; the checkpoint holds gathered shards
        trainer = Trainer(config_from_dict(raw), ctx)
        trainer.load_checkpoint(latest_checkpoint(raw["output_dir"]))  # re-sharded on load
        list(trainer.train())
        tensors = trainer.state_tensors()  # collective: every rank gathers
        if rank == 0:
            torch.save({k: v for k, v in tensors.items() if not k.startswith("rng.")}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(model_dir, prompts, tmp_path):
    """FSDP2 over 2 CPU processes (batch 1 each), interrupted and resumed from a checkpoint, against
    1 uninterrupted process with the same global batch of 2. Differences come only from the order of
    floating-point sums (measured: ~2e-6 absolute after 10 steps): tolerance 1e-4 relative."""
    import torch.multiprocessing as mp

    raw = raw_config(model_dir, prompts, tmp_path / "two", steps=3)
    mp.spawn(
        _worker, args=(2, str(tmp_path / "rendezvous"), raw, str(tmp_path / "two.pt")), nprocs=2, join=True
    )
    two = torch.load(tmp_path / "two.pt")
    one = make(model_dir, prompts, tmp_path / "one", steps=3)
    list(one.train())
    ref = one.state_tensors()
    assert set(two) == {k for k in ref if not k.startswith("rng.")}
    for key, value in two.items():
        assert torch.allclose(value, ref[key], rtol=1e-4, atol=1e-6), key
    init = one.teacher.state_dict()  # the student started from the teacher's weights
    assert any(not torch.equal(ref["generator." + k], v) for k, v in init.items())  # and was updated
    ckpt = latest_checkpoint(str(tmp_path / "two"))
    assert ckpt.endswith("_000003.safetensors")
