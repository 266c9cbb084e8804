#!/usr/bin/env bash
# Score a world DiT on the held-out prompts, as the notes' tables do: model folder -> bundle (onnxruntime)
# -> rf-eval over configs/world_heldout_prompts.txt (12 prompts, never in training).
# Usage (from the repository root):  bash scripts/eval_candidate.sh DIT.safetensors OUT_DIR [SECONDS]
#   VAE=...   the VAE whose decoder draws the frames (default: the committed vae9; vae11 has the same decoder)
#   STAGE=... the model card's training stage (default: student; re-dmd for a DMD generator)
#   SEED=...  the streams' seed (default 0); single-seed differences of 5-10 points are noise here
# Writes OUT_DIR/model, OUT_DIR/bundle and OUT_DIR/eval.json (the summary is printed).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: bash scripts/eval_candidate.sh DIT.safetensors OUT_DIR [SECONDS]" >&2; exit 2; }
dit=$1
out=$2
seconds=${3:-30}
vae=${VAE:-checkpoints/procedural-world/vae9.safetensors}
rf-world --quiet model-dir --vae "$vae" --dit "$dit" --out "$out/model"
rf-export onnx --model-dir "$out/model" --out "$out/bundle" --force --training-stage "${STAGE:-student}" \
    --name candidate --batch-sizes 1 >/dev/null
rf-eval --bundle "$out/bundle" --prompts-file configs/world_heldout_prompts.txt --seconds "$seconds" --seed "${SEED:-0}" \
    --json "$out/eval.json" --quiet
