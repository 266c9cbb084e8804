"""rf-export: lower a model directory to an engine bundle, build TensorRT plans, verify a bundle.
Thin: parse, call the library, report. Errors exit 2 with one line."""

from __future__ import annotations

import argparse
import sys

from rf_runtime.bundle import TRAINING_STAGES


def _precisions(text: str) -> tuple[str, ...]:
    from rf_runtime.bundle import (
        PRECISIONS,
    )  # not rf_runtime.export.precision: parsing must not need onnx / torch

    items = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in items if p not in PRECISIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(PRECISIONS)}")
    return items if "fp32" in items else ("fp32", *items)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        items = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        items = ()
    if not items or any(b < 1 for b in items):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of positive integers, e.g. 1,2,4"
        )
    return tuple(sorted({1, *items}))


def _backends(text: str) -> tuple[str, ...]:
    from rf_runtime.export.verify import BACKENDS

    items = tuple(b.strip() for b in text.split(",") if b.strip())
    bad = [b for b in items if b not in BACKENDS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(BACKENDS)}")
    return items


def _positive_mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the workspace limit as a positive number of MiB")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rf-export", description="Export a model to an engine bundle.")
    from rf_runtime.cli import add_version

    add_version(p)
    sub = p.add_subparsers(dest="command", required=True)

    onnx = sub.add_parser("onnx", help="ONNX bundle: fp32 for onnxruntime, optional fp16/bf16 for TensorRT")
    onnx.add_argument("--model-dir", required=True, help="model directory (as for rf-generate --model-dir)")
    onnx.add_argument("--checkpoint", help="generator checkpoint on top of --model-dir")
    onnx.add_argument(
        "--out",
        required=True,
        help="bundle directory to write (a new path, or an existing bundle with --force)",
    )
    onnx.add_argument(
        "--force",
        action="store_true",
        help="replace the bundle at --out (only a bundle: a directory "
        "without manifest.json is never deleted)",
    )
    onnx.add_argument(
        "--precision",
        type=_precisions,
        default=("fp32",),
        help="comma-separated precisions, e.g. fp32,fp16 (fp32 is always written; fp16/bf16 add "
        "strongly typed <graph>@<precision> variants for TensorRT)",
    )
    onnx.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=(1,),
        help="comma-separated numbers of streams one call of the per-chunk graphs serves, e.g. 1,2,4 "
        "(1 is always written; rf-serve and rf-bench --sessions step that many streams together)",
    )
    onnx.add_argument(
        "--training-stage",
        choices=TRAINING_STAGES,
        help="model card: how the weights were made (default: from the model directory's rf_runtime.json)",
    )
    onnx.add_argument("--name", help="model card: a name for the model (default: the model directory's name)")
    onnx.add_argument(
        "--longest-tested-frames",
        type=int,
        help="model card: the longest stream (video frames) this model was checked on",
    )

    trt = sub.add_parser(
        "trt", help="build TensorRT plans from a bundle's ONNX graphs (NVIDIA GPU + TensorRT)"
    )
    trt.add_argument("bundle", help="bundle directory written by `rf-export onnx`")
    trt.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp16",
        help="which graph variants to build (default fp16; the bundle must hold them)",
    )
    trt.add_argument(
        "--workspace-mib",
        type=_positive_mib,
        default=4096,
        help="TensorRT workspace memory pool limit in MiB (default 4096)",
    )
    trt.add_argument(
        "--timing-cache",
        help="timing cache file to load and update (default: "
        "tensorrt-timing-<TensorRT version>-sm<capability>-<GPU>.cache beside BUNDLE)",
    )
    trt.add_argument(
        "--device",
        type=int,
        default=0,
        help="CUDA device to build on, the one the plans will run on (default 0)",
    )
    trt.add_argument(
        "--graphs", help="comma-separated graph names to build (default: every graph of that precision)"
    )

    verify = sub.add_parser("verify", help="run every graph of a bundle against the PyTorch reference")
    verify.add_argument("bundle", help="bundle directory")
    verify.add_argument("--model-dir", required=True, help="the model directory the bundle was exported from")
    verify.add_argument("--checkpoint", help="generator checkpoint on top of --model-dir")
    verify.add_argument(
        "--backends",
        type=_backends,
        help="comma-separated backends (default: every available one "
        "of onnxruntime-cpu, onnxruntime-cuda, tensorrt; onnx-reference runs bf16 on CPU, slowly)",
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    from rf_runtime.cli import run_command

    # an export can take an hour at full size: its progress (each graph and its time) at INFO
    logging.getLogger("rf_runtime.polygraphy").setLevel(logging.WARNING)
    return run_command("rf-export", _run, parser().parse_args(argv), level=logging.INFO)


def _run(args) -> int:
    if args.command == "onnx":
        from rf_runtime.export.bundle_builder import build_bundle

        card = {
            k: v
            for k, v in (
                ("training_stage", args.training_stage),
                ("name", args.name),
                ("longest_tested_frames", args.longest_tested_frames),
            )
            if v is not None
        }
        path = build_bundle(
            args.model_dir,
            args.out,
            checkpoint=args.checkpoint,
            model_card=card,
            precisions=args.precision,
            batch_sizes=args.batch_sizes,
            force=args.force,
        )
        print(f"wrote bundle {path}")
    elif args.command == "trt":
        from rf_runtime.export.trt_build import build_plans

        graphs = [g.strip() for g in args.graphs.split(",")] if args.graphs else None
        plans = build_plans(
            args.bundle,
            precision=args.precision,
            workspace_mib=args.workspace_mib,
            timing_cache=args.timing_cache,
            graphs=graphs,
            device=args.device,
        )
        for name, entry in plans.items():
            print(
                f"built {name}: {entry['file']} (TensorRT {entry['tensorrt_version']}, "
                f"compute capability {entry['compute_capability']}, {entry['device_name']})"
            )
    else:
        from rf_runtime.export.verify import format_table, verify_bundle

        rows = verify_bundle(
            args.bundle, args.model_dir, args.checkpoint, backends=args.backends, seed=args.seed
        )
        print(format_table(rows))
        failed = [r for r in rows if r.status == "FAIL"]
        if failed:
            print(f"rf-export verify: {len(failed)} of {len(rows)} checks FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
