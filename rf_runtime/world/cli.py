"""rf-world: make data and train the small world model on CPU, stage by stage. Thin: parse, call, report.

    rf-world vae      --out W/vae.safetensors --steps 3000 --max-minutes 12
    rf-world encode   --vae W/vae.safetensors --videos 1500 --out W/latents.safetensors
    rf-world teacher  --data W/latents.safetensors --out W/teacher.safetensors --steps 3000 --max-minutes 25
    rf-world student  --data W/latents.safetensors --teacher W/teacher.safetensors --out W/student.safetensors
    rf-world ode-pairs --teacher W/teacher.safetensors --prompts-file configs/world_prompts.txt --out W/ode.safetensors
    rf-world student  --objective ode --data W/ode.safetensors --teacher W/student.safetensors --out W/student_ode.safetensors
    rf-world model-dir --vae W/vae.safetensors --dit W/student.safetensors --out W/model

Every stage writes its weights atomically, ``<out>.json`` with the config, and ``<out>.log.json``
with the per-step losses.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rf_runtime.errors import InputError, RFError


def _common(p, steps, batch, lr):
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    p.add_argument("--max-minutes", type=float, help="stop early after this much training time")
    p.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="seconds-sized models (smoke tests)")


def _parser():
    p = argparse.ArgumentParser(prog="rf-world", description="Train the small procedural-world model on CPU.")
    from rf_runtime.cli import add_version

    add_version(p)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("vae", help="train the VAE (autoencoder on procedural clips)"), 3000, 4, 2e-3)
    enc = sub.add_parser("encode", help="render procedural clips and encode them with the VAE")
    enc.add_argument("--vae", required=True)
    enc.add_argument("--videos", type=int, default=1500)
    enc.add_argument("--out", required=True)
    enc.add_argument("--seed", type=int, default=1_000_000)
    enc.add_argument("--max-minutes", type=float, help="stop early (after a batch) after this much time")
    enc.add_argument("--tiny", action="store_true")
    _common(
        sub.add_parser("teacher", help="train the bidirectional teacher DiT (flow matching)"), 3000, 16, 5e-4
    )
    st = sub.add_parser("student", help="fine-tune the causal student from the teacher (teacher forcing)")
    _common(st, 500, 8, 2e-4)
    st.add_argument("--teacher", required=True, help="the weights to start from (the teacher, or a student)")
    st.add_argument(
        "--objective",
        choices=("flow", "ode"),
        default="flow",
        help="flow: teacher-forced flow matching on encoded clips (default); ode: regression on the "
        "teacher's ODE pairs (--data from `rf-world ode-pairs`)",
    )
    op = sub.add_parser(
        "ode-pairs", help="the teacher's CFG samples with their ODE paths, for `student --objective ode`"
    )
    op.add_argument("--teacher", required=True, help="bidirectional teacher DiT weights")
    op.add_argument("--prompts-file", required=True, help="one prompt per line (the training prompts)")
    op.add_argument("--clips", type=int, default=1000, help="ODE pairs to make (default 1000)")
    op.add_argument("--steps", type=int, default=16, help="Euler steps of the teacher's ODE (default 16)")
    op.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance (default 1.5)")
    op.add_argument("--batch", type=int, default=8)
    op.add_argument("--seed", type=int, default=0)
    op.add_argument("--max-minutes", type=float, help="stop early (after a batch) after this much time")
    op.add_argument("--out", required=True, help="ODE pairs to write (.safetensors)")
    op.add_argument("--tiny", action="store_true")
    for name in ("teacher", "student"):
        sub.choices[name].add_argument("--data", required=True, help="latents from `rf-world encode`")
    for name in ("vae", "teacher"):
        sub.choices[name].add_argument("--init", help="continue training from these weights")
    sub.choices["vae"].add_argument("--crop", type=int, help="train on random crops of this size (e.g. 32)")
    sub.choices["vae"].add_argument(
        "--clip-frames",
        type=int,
        default=9,
        help="frames per training clip, 1 + k x the temporal stride (default 9)",
    )
    sub.choices["vae"].add_argument(
        "--decoder-only",
        action="store_true",
        help="freeze the encoder and keep the latent normalisation (latents already encoded, and DiTs "
        "trained on them, stay valid)",
    )
    sub.choices["vae"].add_argument(
        "--balance-backgrounds",
        action="store_true",
        help="train on black, gray and white backgrounds a third each (the world alone: black 2/3)",
    )
    sub.choices["vae"].add_argument(
        "--fg-weight",
        type=float,
        default=4.0,
        help="extra weight of the pixels that differ from the background, read from the input frames "
        "(default 4)",
    )
    sub.choices["vae"].add_argument(
        "--z-dim",
        type=int,
        help="latent channels of a fresh VAE (default 8; Wan2.1's VAE has 16); with --init, the init's",
    )
    sub.choices["vae"].add_argument(
        "--encoder-only",
        action="store_true",
        help="freeze the decoder and keep its latent normalisation (e.g. a decoder "
        "from `rf-world from-bundle`)",
    )
    fb = sub.add_parser(
        "from-bundle", help="the DiT and the VAE decoder of an exported bundle, to continue training"
    )
    fb.add_argument("--bundle", required=True, help="bundle directory (rf-export onnx)")
    fb.add_argument("--dit-out", required=True, help="DiT weights to write (teacher --init)")
    fb.add_argument(
        "--vae-out",
        required=True,
        help="VAE to write: the bundle's decoder, a fresh encoder (vae --init --encoder-only)",
    )
    fb.add_argument("--tiny", action="store_true")
    sub.choices["teacher"].add_argument(
        "--text-dropout",
        type=float,
        default=0.1,
        help="fraction of samples trained without text, for CFG (default 0.1)",
    )
    sub.choices["teacher"].add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="write the moving average of the weights with this decay, warmed up as min(decay, (1+n)/(10+n)) "
        "(e.g. 0.999; default 0: the last weights)",
    )
    wi = sub.add_parser(
        "widen",
        help="a DiT at twice the width computing the same function, to train a larger teacher from it",
    )
    wi.add_argument("--dit", required=True, help="DiT weights (+ .json config) to widen")
    wi.add_argument("--out", required=True, help="widened DiT to write (teacher --init)")
    wi.add_argument(
        "--noise", type=float, default=0.05, help="symmetry-breaking split of the copies (default 0.05)"
    )
    wi.add_argument("--tiny", action="store_true")
    rc = sub.add_parser(
        "rechannel",
        help="a DiT for latents of another channel count (a new VAE): fresh latent input and output "
        "layers, every other weight kept, to continue a teacher on the new latents",
    )
    rc.add_argument("--dit", required=True, help="DiT weights (+ .json config) to start from")
    rc.add_argument("--z-dim", type=int, required=True, help="the new VAE's latent channels")
    rc.add_argument("--out", required=True, help="DiT to write (teacher --init)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--tiny", action="store_true")
    for name in ("teacher", "student"):
        sub.choices[name].add_argument(
            "--fg-weight",
            type=float,
            default=3.0,
            help="extra loss weight on the shape's latent cells (default 3; 0 = plain MSE)",
        )
    sa = sub.add_parser(
        "sample", help="sample a bidirectional DiT (the teacher) into a PNG grid, to check it"
    )
    sa.add_argument("--dit", required=True)
    sa.add_argument("--vae", required=True)
    sa.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one row each)")
    sa.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (default 0)")
    sa.add_argument("--steps", type=int, default=24, help="Euler steps (default 24)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", required=True, help="PNG to write: one row per prompt, every other latent frame")
    sa.add_argument("--tiny", action="store_true")
    md = sub.add_parser("model-dir", help="write a model directory that rf-generate / rf-export read")
    md.add_argument("--vae", required=True)
    md.add_argument("--dit", required=True)
    md.add_argument("--out", required=True)
    md.add_argument("--note", default="", help="free text for the model card")
    md.add_argument("--tiny", action="store_true")
    ge = sub.add_parser(
        "generator", help="the generator (EMA) of an rf-train checkpoint alone, as a small DiT file"
    )
    ge.add_argument("--checkpoint", required=True, help="rf-train checkpoint_*.safetensors")
    ge.add_argument("--raw", action="store_true", help="the raw generator instead of its EMA")
    ge.add_argument(
        "--model-dir",
        help="the model folder whose DiT config the generator has (default: the checkpoint's student folder)",
    )
    ge.add_argument(
        "--out",
        required=True,
        help="DiT weights to write (+ <out>.json config); rf-export --checkpoint reads it",
    )
    ge.add_argument("--tiny", action="store_true")
    sh = sub.add_parser(
        "sheet", help="contact sheet PNG of a bundle's streams: one row per prompt, frames spread over time"
    )
    sh.add_argument("--engine", help="bundle directory (default: the shipped one)")
    sh.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one row each)")
    sh.add_argument("--seconds", type=float, default=30.0, help="stream length (default 30)")
    sh.add_argument(
        "--columns", type=int, default=8, help="frames per row, evenly spread over the stream (default 8)"
    )
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--out", required=True, help="PNG to write")
    dg = sub.add_parser(
        "diagnose",
        help="where prompts are lost: the prompt-following checks on the world's renders, the VAE's "
        "reconstructions, the teacher's samples and the streamed model, side by side",
    )
    dg.add_argument("--vae", help="VAE weights (rf-world vae): scores its reconstructions")
    dg.add_argument("--teacher", help="teacher DiT weights (needs --vae): scores its CFG samples")
    dg.add_argument("--engine", help="bundle to stream (the streamed model's stage)")
    dg.add_argument(
        "--prompts-file", default=None, help="prompts, one per line (default: the held-out prompts)"
    )
    dg.add_argument("--seconds", type=float, default=4.0, help="video length per prompt (default 4)")
    dg.add_argument("--guidance", type=float, default=3.0, help="the teacher's CFG scale (default 3)")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--out", help="JSON to write (every prompt's checks per stage)")
    dg.add_argument("--tiny", action="store_true")
    pr = sub.add_parser("prompts", help="write procedural prompts, one per line (for rf-train)")
    pr.add_argument("--count", type=int, default=500)
    pr.add_argument("--seed", type=int, default=2_000_000)
    pr.add_argument("--out", required=True)
    ab = sub.add_parser(
        "ablate", help="cache variants (and several students) over long streams: table + plots"
    )
    ab.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR[@CHECKPOINT]",
        help="a model directory (and generator checkpoint) to compare (repeat for DMD vs Re-DMD students)",
    )
    ab.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME=BUNDLE",
        help="a bundle exported from model NAME: the variants that change only the EMA-Sink rate stream "
        "through it (onnxruntime, several times faster; the others use the model directory)",
    )
    ab.add_argument(
        "--variants",
        default=",".join(_variant_names()),
        help="comma-separated cache variants (default: all of %(default)s)",
    )
    ab.add_argument(
        "--prompt", action="append", help="prompt (repeatable; default: three procedural prompts)"
    )
    ab.add_argument(
        "--prompts-file",
        help="prompts, one per line (e.g. configs/world_heldout_prompts.txt); with --prompt: both",
    )
    ab.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    ab.add_argument("--seconds", type=float, default=60.0, help="stream length (default 60)")
    ab.add_argument("--jobs", type=int, default=1, help="runs at once, one process and core each (default 1)")
    ab.add_argument(
        "--reuse",
        metavar="ABLATION_JSON",
        help="an earlier ablation.json: its runs of the same model (name and directory), variant, prompt, "
        "seed and stream length are taken as they are, not streamed again (e.g. to add a model to a grid)",
    )
    ab.add_argument("--out", required=True, help="directory for ablation.md/.json and the plots")
    return p


def _variant_names():
    from rf_runtime.world.ablation import CACHE_VARIANTS

    return list(CACHE_VARIANTS)


def main(argv: list[str] | None = None) -> int:
    from rf_runtime.cli import run_command

    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("rf-world", _run, args, level=logging.INFO)


def _run(args) -> int:
    import torch
    from tqdm import tqdm

    from rf_runtime.world import training as T

    torch.set_num_threads(args.threads)
    if args.command == "ablate":
        return _ablate(args)
    if args.command == "sheet":
        return _sheet(args)
    if args.command == "diagnose":
        return _diagnose(args)
    if args.command == "prompts":
        from rf_runtime.world.heldout import training_scenes

        lines = "".join(s.prompt + "\n" for s in training_scenes(args.count, args.seed))

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(lines)

        T.atomic_save(write, args.out, create_folder=True)
        print(f"wrote {args.count} prompts to {args.out}")
        return 0
    cfg = T.TINY if args.tiny else T.WorldConfig()
    if getattr(args, "vae", None) and args.command in ("encode", "sample", "model-dir"):
        cfg = cfg.with_vae(T.load_vae(args.vae).config)  # latent channels and size follow the VAE
    max_s = args.max_minutes * 60 if getattr(args, "max_minutes", None) else None
    total = getattr(args, "clips", None) or getattr(args, "steps", None) or getattr(args, "videos", None)
    bar = tqdm(total=total, disable=args.quiet, file=sys.stderr, mininterval=5)

    def on_step(step, logs):
        bar.n = step + 1 if args.command not in ("encode", "ode-pairs") else step
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "mse", "kl")}, refresh=False)
        bar.refresh()

    if args.command == "vae":
        init = T.load_vae(args.init) if args.init else None
        if args.z_dim is not None:
            if init is not None and init.config.z_dim != args.z_dim:
                raise InputError(
                    f"--z-dim {args.z_dim} differs from --init's z_dim {init.config.z_dim}: "
                    "leave out --z-dim to continue the init, or --init to train a fresh VAE"
                )
            cfg = cfg.with_latent_channels(args.z_dim)
        if init is not None:
            cfg = cfg.with_vae(init.config)
        vae, history = T.train_vae(
            cfg,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            max_seconds=max_s,
            crop=args.crop,
            init=init,
            clip_frames=args.clip_frames,
            decoder_only=args.decoder_only,
            encoder_only=args.encoder_only,
            fg_weight=args.fg_weight,
            balance_backgrounds=args.balance_backgrounds,
            on_step=on_step,
        )
        # a fresh or fully retrained VAE gets its encoder's latent statistics; a part trained against
        # the other, frozen part keeps the normalisation the frozen part (and any DiT) was made with
        if not (args.encoder_only or args.decoder_only):
            vae = T.with_config(vae, T.latent_stats(vae, cfg, num_videos=16 if args.tiny else 64))
        T.save_vae(vae, args.out)
    elif args.command == "from-bundle":
        from rf_runtime.world.from_bundle import dit_from_bundle, vae_from_bundle

        T.save_dit(dit_from_bundle(args.bundle, cfg.dit), args.dit_out)
        T.save_vae(vae_from_bundle(args.bundle, cfg.vae), args.vae_out)
        args.out = f"{args.dit_out} and {args.vae_out}"
        history = None
    elif args.command == "sample":
        _sample(args, cfg)
        history = None
    elif args.command == "encode":
        data = T.encode_dataset(
            T.load_vae(args.vae), cfg, args.videos, seed=args.seed, max_seconds=max_s, on_step=on_step
        )
        data.save(args.out)
        history = None
    elif args.command == "teacher":
        init = T.load_dit(args.init) if args.init else None
        data = T.LatentData.load(args.data)
        model, history = T.train_teacher(
            cfg.with_latent_channels(data.channels),
            data,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            max_seconds=max_s,
            init=init,
            text_dropout=args.text_dropout,
            fg_weight=args.fg_weight,
            ema=args.ema,
            on_step=on_step,
        )
        T.save_dit(model, args.out)
    elif args.command == "widen":
        from rf_runtime.world.widen import widen_dit

        T.save_dit(widen_dit(T.load_dit(args.dit), noise=args.noise), args.out)
        history = None
    elif args.command == "rechannel":
        from rf_runtime.world.widen import rechannel_dit

        T.save_dit(rechannel_dit(T.load_dit(args.dit), args.z_dim, seed=args.seed), args.out)
        history = None
    elif args.command == "student":
        data = T.LatentData.load(args.data)
        model, history = T.train_student(
            cfg.with_latent_channels(data.channels),
            data,
            T.load_dit(args.teacher),
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            max_seconds=max_s,
            fg_weight=args.fg_weight,
            objective=args.objective,
            on_step=on_step,
        )
        T.save_dit(model, args.out)
    elif args.command == "ode-pairs":
        from rf_runtime.world.heldout import read_prompts_file

        data = T.teacher_ode_pairs(
            T.load_dit(args.teacher),
            cfg,
            read_prompts_file(args.prompts_file),
            args.clips,
            steps=args.steps,
            guidance=args.guidance,
            batch=args.batch,
            seed=args.seed,
            max_seconds=max_s,
            on_step=on_step,
        )
        data.save(args.out)
        history = None
    elif args.command == "generator":
        from rf_runtime.models import CausalDiT
        from rf_runtime.models.dit import load_checkpoint_file, normalize_state_dict

        state = normalize_state_dict(load_checkpoint_file(args.checkpoint), use_ema=not args.raw)
        T.save_dit(CausalDiT.from_state_dict(state, _generator_config(args, cfg)), args.out)
        history = None
    else:
        from rf_runtime.world.procedural import VOCABULARY

        card = {"name": "procedural-world", "note": args.note, "vocabulary": list(VOCABULARY)}
        T.write_model_dir(args.out, cfg, T.load_dit(args.dit), T.load_vae(args.vae), card)
        history = None
    bar.close()
    if history is not None:
        T.save_json(history, args.out + ".log.json")
        last = history[-1]
        print(
            f"wrote {args.out}: {len(history)} steps in {last['seconds']:.0f} s, final loss {last['loss']:.4f}"
        )
    else:
        print(f"wrote {args.out}")
    return 0


def _generator_config(args, cfg):
    """The generator's DiT config: the ``--model-dir``'s, else the student folder the rf-train
    checkpoint was trained from (its metadata), else the world's default size."""
    import json
    import os

    from rf_runtime.models import DiTConfig

    folder = args.model_dir
    if folder is None:  # an rf-train checkpoint names its student folder; older ones have the default size
        from safetensors import safe_open

        with safe_open(args.checkpoint, "pt") as f:
            folder = json.loads((f.metadata() or {}).get("config", "{}")).get("student")
        if folder is None:
            return cfg.dit
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{folder} has no config.json: give --model-dir the student's model folder")
    return DiTConfig.from_json(path)


def _sample(args, cfg) -> None:
    import numpy as np
    import torch

    from rf_runtime.backends.base import to_uint8_frames
    from rf_runtime.world import training as T

    dit, vae = T.load_dit(args.dit), T.load_vae(args.vae)
    text = torch.from_numpy(cfg.text.encode(args.prompt))
    h, w = cfg.latent_hw
    z = T.sample_teacher(
        dit,
        text,
        (cfg.latent_frames, cfg.vae.z_dim, h, w),
        steps=args.steps,
        guidance=args.guidance,
        shift=cfg.stream.shift,
        seed=args.seed,
    )
    with torch.no_grad():
        pixels = vae.decode(z.transpose(1, 2)).numpy()  # [B, 3, T, H, W] in [-1, 1]
    frames = [to_uint8_frames(p) for p in pixels]  # [T, H, W, 3] each
    grid = np.concatenate([np.concatenate(list(row[::2]), axis=1) for row in frames], axis=0)

    def write(tmp):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(tmp, grid, format="png")

    T.atomic_save(write, args.out, create_folder=True)


def _sheet(args) -> int:
    import numpy as np

    from rf_runtime.streamer import Streamer
    from rf_runtime.world import training as T

    if args.columns < 1 or not args.seconds > 0:
        raise RFError("--columns and --seconds must be positive")
    streamer = Streamer.from_engine(args.engine)
    num_frames = max(args.columns, round(args.seconds * streamer.fps))
    picks = np.linspace(0, num_frames - 1, args.columns).round().astype(int)
    rows = []
    for prompt in args.prompt:
        frames = np.concatenate(list(streamer.stream(prompt, seed=args.seed, num_frames=num_frames)))
        rows.append(frames[picks])

    def write(tmp):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            len(rows), args.columns, figsize=(1.3 * args.columns, 1.55 * len(rows)), squeeze=False
        )
        for r, (prompt, row) in enumerate(zip(args.prompt, rows)):
            for c, frame in enumerate(row):
                ax = axes[r][c]
                ax.imshow(frame, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == len(rows) - 1:
                    ax.set_xlabel(f"{picks[c] / streamer.fps:.1f} s", fontsize=7)
            axes[r][0].set_title(prompt, fontsize=7, loc="left")
        fig.tight_layout(pad=0.3)
        fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

    T.atomic_save(write, args.out)
    print(
        f"wrote {args.out}: {len(rows)} prompts x {args.columns} frames of {num_frames / streamer.fps:g} s streams"
    )
    return 0


def _diagnose(args) -> int:
    from rf_runtime.world import diagnose
    from rf_runtime.world import training as T
    from rf_runtime.world.heldout import HELDOUT_PROMPTS

    if args.teacher and not args.vae:
        raise RFError("--teacher needs --vae (the teacher's samples are latents: the VAE decodes them)")
    if not args.seconds > 0:
        raise RFError("--seconds must be positive")
    prompts = list(HELDOUT_PROMPTS)
    if args.prompts_file:
        from rf_runtime.world.heldout import read_prompts_file

        prompts = read_prompts_file(args.prompts_file)
    streamer = None
    if args.engine:
        from rf_runtime.streamer import Streamer

        streamer = Streamer.from_engine(args.engine)
    vae = T.load_vae(args.vae) if args.vae else None
    cfg = T.TINY if args.tiny else T.WorldConfig()
    if vae is not None:
        cfg = cfg.with_vae(vae.config)  # the teacher's samples have the VAE's latent channels
    scores = diagnose.stage_scores(
        prompts,
        vae=vae,
        teacher=T.load_dit(args.teacher) if args.teacher else None,
        streamer=streamer,
        seconds=args.seconds,
        guidance=args.guidance,
        seed=args.seed,
        cfg=cfg,
    )
    print(diagnose.stage_table(scores))
    if args.out:
        T.save_json(scores, args.out)
        print(f"wrote {args.out}")
    return 0


def _name_value(item: str, flag: str, form: str) -> tuple[str, str]:
    """``NAME=VALUE`` of a repeatable option, or a clear error naming the form it takes."""
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise RFError(f"{flag} {item!r}: write it as {form}")
    return name, value


def _models(items: list[str]) -> dict:
    """``--model NAME=DIR[@CHECKPOINT]`` options: name -> directory or (directory, checkpoint)."""
    models = {}
    for item in items:
        name, path = _name_value(
            item, "--model", "NAME=DIR or NAME=DIR@CHECKPOINT, e.g. --model re-dmd=work/model"
        )
        models[name] = tuple(path.split("@", 1)) if "@" in path else path
    return models


def _reusable_runs(path: str, models: dict, seconds: float) -> tuple[list, str]:
    """The runs of an earlier ablation.json that this ablation can take as they are, and the command that
    made them. Its models and stream length are read back from that command (this CLI wrote it): a run is
    reusable when its model has the same name and directory (and checkpoint) here and the streams are as
    long; a name that now means another directory is refused rather than mixed in."""
    import os
    import shlex

    from rf_runtime.world import ablation as A

    earlier, runs = A.read_runs(path)
    try:
        words = shlex.split(earlier)
        old = _parser().parse_args(words[1:]) if words[:1] == ["rf-world"] else None
    except (ValueError, SystemExit):
        old = None
    if old is None or old.command != "ablate":
        raise RFError(
            f"--reuse {path}: its 'command' is not an rf-world ablate command, so its runs cannot be matched"
        )
    if old.seconds != seconds:
        raise RFError(
            f"--reuse {path}: its streams are {old.seconds:g} s long and this ablation's {seconds:g} s; "
            f"pass --seconds {old.seconds:g}, or drop --reuse"
        )
    old_models = _models(old.model)

    def where(model):
        parts = model if isinstance(model, tuple) else (model,)
        return tuple(os.path.abspath(p) for p in parts)

    for name, model in models.items():
        if name in old_models and where(old_models[name]) != where(model):
            raise RFError(
                f"--reuse {path}: model {name!r} was {'@'.join(where(old_models[name]))} there and is "
                f"{'@'.join(where(model))} here; give this model another name, or drop --reuse"
            )
    return [r for r in runs if r.model in models and r.model in old_models], earlier


def _ablate(args) -> int:
    import shlex

    from tqdm import tqdm

    from rf_runtime.world import ablation as A

    models = _models(args.model)
    engines = dict(
        _name_value(item, "--engine", "NAME=BUNDLE, e.g. --engine re-dmd=engines/procedural-world-64")
        for item in args.engine
    )
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in A.CACHE_VARIANTS]
    if unknown:
        raise RFError(f"unknown cache variants {unknown}: choose from {list(A.CACHE_VARIANTS)}")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        from rf_runtime.world.heldout import read_prompts_file

        prompts += read_prompts_file(args.prompts_file)
    prompts = prompts or list(A.DEFAULT_PROMPTS)
    reused, reused_from = [], None
    if args.reuse:
        reused, earlier = _reusable_runs(args.reuse, models, args.seconds)
        reused_from = {"path": args.reuse, "command": earlier}
    total = len(models) * len(names) * len(prompts) * args.seeds
    bar = tqdm(total=total, unit="run", disable=args.quiet, file=sys.stderr)
    runs = A.run_ablation(
        models,
        {v: A.CACHE_VARIANTS[v] for v in names},
        prompts,
        list(range(args.seeds)),
        args.seconds,
        on_run=lambda run: bar.update(1),
        jobs=args.jobs,
        engines=engines,
        reuse=reused,
    )
    bar.close()
    if reused_from is not None:
        reused_ids = {id(x) for x in reused}
        reused_from["runs"] = sum(id(r) in reused_ids for r in runs)
    command = "rf-world " + " ".join(shlex.quote(a) for a in args.argv)
    for path in A.write_report(runs, args.out, command, reused_from=reused_from):
        print(f"wrote {path}")
    print(A.markdown_table(A.summarize(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
