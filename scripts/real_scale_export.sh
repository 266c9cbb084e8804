#!/usr/bin/env bash
# Rehearse the export of a Wan2.1-T2V-1.3B-sized model on a CPU machine (docs/notes/export.md,
# "Export at real scale"): a random-weight model folder at the real geometry, its bundle at a small
# resolution (exported, checked as TensorRT would see it, verified against PyTorch, streamed), then
# the bundle at 480x832, checked the same way, with the memory estimate of both.
#
#   bash scripts/real_scale_export.sh WORK_DIR
#
# WORK_DIR gets model/ (3 GB, bf16 weights), small/ (the same weights, linked, at SMALL_RESOLUTION),
# bundle-small/, bundle-480x832/ (about 9 GB with fp16) and one .log / .time file per step.
# Environment: PRECISIONS (default fp32,fp16), SMALL_RESOLUTION (default 64x112), CHUNKS (streamed
# chunks, default 3), FULL=0 to stop after the small bundle, SMALL=0 to skip it, STEP=1 to time one fp32 step of the
# full-size graph through onnxruntime CPU (more than 18 GiB: it did not fit the 24 GiB machine this
# was written on, shared), GPU_GIB (default 24: the GPU the full-size estimate is checked against).
# Peak memory (docs/notes/export.md): 9.1 GiB for the small export, 13.2 GiB for its verify, about
# 16 GiB for the 480x832 export (the trace of the per-frame VAE graph) and 11 GiB for its checks.
# Needs the export and cpu extras; /usr/bin/time (GNU time) for the peak RSS of each step, if present.
set -euo pipefail

WORK=${1:?usage: bash scripts/real_scale_export.sh WORK_DIR}
PRECISIONS=${PRECISIONS:-fp32,fp16}
SMALL_RESOLUTION=${SMALL_RESOLUTION:-64x112}
CHUNKS=${CHUNKS:-3}
FULL=${FULL:-1}
SMALL=${SMALL:-1}
STEP=${STEP:-0}
GPU_GIB=${GPU_GIB:-24}
HERE=$(cd "$(dirname "$0")" && pwd)
REPORT="python $HERE/real_scale_report.py"
mkdir -p "$WORK"

# step NAME CMD...: run CMD with its output in WORK/NAME.log and, with GNU time, its peak RSS and wall
# time in WORK/NAME.time
step() {
  local name=$1
  shift
  echo "== $name: $*"
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$WORK/$name.time" "$@" 2>&1 | tee "$WORK/$name.log"
    grep -E "Maximum resident|Elapsed" "$WORK/$name.time" | sed 's/^\s*/   /'
  else
    "$@" 2>&1 | tee "$WORK/$name.log"
  fi
}

if [ ! -f "$WORK/model/config.json" ]; then
  step model python -m rf_runtime.testing --preset wan2.1-1.3b "$WORK/model"
fi
CKPT_NAME=generator.pt

# the same weights at a small resolution: links to the weight files, the card with another resolution
python - "$WORK" "$SMALL_RESOLUTION" <<'EOF'
import json, os, sys
work, (h, w) = sys.argv[1], (int(v) for v in sys.argv[2].split("x"))
small = os.path.join(work, "small")
os.makedirs(small, exist_ok=True)
for name in ("generator.pt", "vae.pth", "config.json"):
    if not os.path.lexists(os.path.join(small, name)):
        os.symlink(os.path.join("..", "model", name), os.path.join(small, name))
with open(os.path.join(work, "model", "rf_runtime.json")) as f:
    card = json.load(f)
card["resolution"] = [h, w]
with open(os.path.join(small, "rf_runtime.json"), "w") as f:
    json.dump(card, f)
EOF

export_bundle() {  # NAME MODEL_DIR
  step "export-$1" rf-export onnx --model-dir "$2" --checkpoint "$2/$CKPT_NAME" --out "$WORK/bundle-$1" \
    --precision "$PRECISIONS" --force
  step "files-$1" $REPORT files "$WORK/bundle-$1"
}

if [ "$SMALL" = 1 ]; then
  export_bundle small "$WORK/small"
  step verify-small rf-export verify "$WORK/bundle-small" --model-dir "$WORK/small" \
    --checkpoint "$WORK/small/$CKPT_NAME" --backends onnxruntime-cpu
  step estimate-small rf-bench --estimate "$WORK/bundle-small"
  step stream-small $REPORT stream "$WORK/bundle-small" "$CHUNKS"
fi

if [ "$FULL" = 1 ]; then
  export_bundle 480x832 "$WORK/model"
  step estimate-480x832-cpu rf-bench --estimate "$WORK/bundle-480x832" || true  # exit 1: does not fit
  step estimate-480x832-gpu rf-bench --estimate "$WORK/bundle-480x832" --device cuda \
    --device-memory "$GPU_GIB" || true
  if [ "$STEP" = 1 ]; then
    step step-480x832 $REPORT step "$WORK/bundle-480x832"
  fi
fi
echo "done: logs and times in $WORK"
