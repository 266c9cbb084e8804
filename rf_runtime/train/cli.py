"""``rf-train --config FILE``: Re-DMD training from a YAML or JSON config.

Single process:   rf-train --config configs/tiny_redmd.yaml
N GPUs (FSDP2):   torchrun --nproc_per_node N -m rf_runtime.train.cli --config FILE
N CPU processes:  torchrun --nproc_per_node N -m rf_runtime.train.cli --config FILE --device cpu
Resume:           rf-train --config FILE --resume            (the newest checkpoint in output_dir)
                  rf-train --config FILE --resume PATH
Change a key:     rf-train --config FILE --set optim.lr=1e-5 --set student=DIR   (paths from the working directory)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading

from rf_runtime.errors import RFError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rf-train",
        description="Re-DMD training of a causal Reward Forcing student "
        "(Self-Forcing rollouts, reward-weighted DMD, EMA-Sink cache).",
    )
    from rf_runtime.cli import add_version

    add_version(p)
    p.add_argument(
        "--config", required=True, help="YAML or JSON training config (see configs/tiny_redmd.yaml)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint: PATH, or without a value the newest one in output_dir",
    )
    p.add_argument("--steps", type=int, help="train until this step (overrides the config's 'steps')")
    p.add_argument("--output-dir", help="overrides the config's 'output_dir'")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's 'device'")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for nested ones: optim.lr=1e-5, reward.kind=none; the value "
        "is read as YAML; paths are relative to the working directory); repeatable",
    )
    p.add_argument(
        "--measure-reward",
        type=int,
        metavar="BATCHES",
        help="do not train: print the reward's mean/std/min/max on BATCHES batches of the student's "
        "samples (fully denoised), e.g. to set reward.motion.mean and std",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from rf_runtime.cli import run_command

    return run_command("rf-train", _train, _parser().parse_args(argv), level=logging.INFO)


def _train(args) -> int:
    from tqdm import tqdm

    from rf_runtime.train import distributed as D
    from rf_runtime.train.config import load_config, parse_overrides
    from rf_runtime.train.trainer import Trainer, latest_checkpoint

    overrides = parse_overrides(args.set)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.output_dir:
        overrides["output_dir"] = os.path.abspath(args.output_dir)
    if args.device:
        overrides["device"] = args.device
    config = load_config(args.config, overrides)
    if not args.measure_reward:
        _check_output_dir(config.output_dir, resuming=bool(args.resume))
    ctx = D.context_from_env(config.device)
    trainer = Trainer(config, ctx)
    if args.measure_reward:
        stats = trainer.reward_statistics(args.measure_reward)
        if ctx.is_main:
            print(json.dumps(stats))
        return 0
    if args.resume:
        path = latest_checkpoint(config.output_dir) if args.resume == "latest" else args.resume
        if path is None:
            raise RFError(
                f"--resume: no checkpoint in {config.output_dir}; run without --resume to start training"
            )
        trainer.load_checkpoint(path)
    if trainer.step >= config.steps:
        raise RFError(
            f"nothing to train: the run is at step {trainer.step} and 'steps' is {config.steps}; "
            "pass --steps N with N above it (no checkpoint was written)"
        )
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        unit="step",
        file=sys.stderr,
        disable=args.quiet or not ctx.is_main,
    )
    last, written = None, []
    with _stop_at_step_boundary(trainer):
        try:
            for record in trainer.train(on_checkpoint=written.append):
                bar.update(1)
                shown = {
                    k: f"{v:.4g}"
                    for k, v in record.values.items()
                    if k in ("critic_loss", "generator_loss", "reward_mean")
                }
                bar.set_postfix(shown)
                last = record
        except (
            KeyboardInterrupt
        ):  # a second Ctrl-C / SIGTERM: the step under way is not complete, so not saved
            bar.close()
            kept = (
                f"continue from {written[-1]} with --resume"
                if written
                else "no checkpoint of this run was written"
            )
            print(
                f"interrupted again during step {trainer.step + 1}: that step was not saved; {kept}",
                file=sys.stderr,
            )
            return 130
    bar.close()
    if trainer.stopped:
        if ctx.is_main:
            print(
                f"interrupted: stopped after step {trainer.step} and saved {written[-1]}; continue with --resume",
                file=sys.stderr,
            )
        return 130
    if ctx.is_main:
        print(
            f"trained to step {trainer.step}; checkpoint {written[-1]}; log {os.path.join(config.output_dir, 'log.jsonl')}"
            + (f"; last critic loss {last.values.get('critic_loss'):.4g}" if last else "")
        )
    if ctx.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


@contextlib.contextmanager
def _stop_at_step_boundary(trainer):
    """While training: the first SIGINT / SIGTERM asks the trainer to stop after the step under way (it
    saves a checkpoint there, so a resume never repeats half a step); a second one interrupts at once."""

    def first(signum, frame):
        trainer.request_stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, second)

    def second(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers live there only
        yield
        return
    previous = {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_output_dir(output_dir: str, resuming: bool) -> None:
    """Fail before any work on an output_dir that cannot be written, or that holds another run's
    checkpoints (a fresh start would overwrite some of them, interleave its log.jsonl with theirs, and a
    later --resume would pick up the other run's newest checkpoint)."""
    from rf_runtime.train.trainer import latest_checkpoint

    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise RFError(
            f"cannot create output_dir {output_dir} ({exc.strerror}): set 'output_dir' in the config "
            "or --output-dir to a folder you can write to"
        ) from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise RFError(
            f"output_dir {output_dir} is not writable: set 'output_dir' or --output-dir to a folder "
            "you can write to"
        )
    existing = latest_checkpoint(output_dir)
    if existing and not resuming:
        raise RFError(
            f"output_dir {output_dir} already holds a run ({os.path.basename(existing)}): pass --resume "
            "to continue it, or --output-dir NEW_DIR to start a new run"
        )


if __name__ == "__main__":
    sys.exit(main())
