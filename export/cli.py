"""rf-export: lower a model directory to an engine bundle. Thin: parse, call, report."""

from __future__ import annotations

import argparse
import sys

from rf_runtime.bundle import TRAINING_STAGES
from rf_runtime.errors import RFError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rf-export", description="Export a model to an engine bundle.")
    sub = p.add_subparsers(dest="command", required=True)
    onnx = sub.add_parser("onnx", help="fp32 ONNX bundle for onnxruntime (CPU)")
    onnx.add_argument("--model-dir", required=True, help="model directory (as for rf-generate --model-dir)")
    onnx.add_argument("--checkpoint", help="generator checkpoint on top of --model-dir")
    onnx.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    onnx.add_argument("--training-stage", choices=TRAINING_STAGES,
                      help="model card: how the weights were made (default: from the model directory's rf_runtime.json)")
    onnx.add_argument("--name", help="model card: a name for the model (default: the model directory's name)")
    onnx.add_argument("--longest-tested-frames", type=int,
                      help="model card: the longest stream (video frames) this model was checked on")
    args = p.parse_args(argv)
    card = {k: v for k, v in (("training_stage", args.training_stage), ("name", args.name),
                              ("longest_tested_frames", args.longest_tested_frames)) if v is not None}
    try:
        from export.bundle_builder import build_bundle

        path = build_bundle(args.model_dir, args.out, checkpoint=args.checkpoint, model_card=card)
    except RFError as exc:
        print(f"rf-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
