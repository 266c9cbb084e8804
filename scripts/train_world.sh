#!/usr/bin/env bash
# Train the procedural-world model from nothing on CPU and export it as the default engine bundle.
# Usage: bash scripts/train_world.sh WORK_DIR      (about an hour on one core; see docs/notes/world.md)
# Each stage can be re-run alone; the numbers are the ones the shipped bundle was made with.
set -euo pipefail
W="${1:?usage: bash scripts/train_world.sh WORK_DIR}"
mkdir -p "$W"
rf-world --quiet vae --steps 1500 --max-minutes 14 --out "$W/vae0.safetensors"
rf-world --quiet vae --init "$W/vae0.safetensors" --crop 32 --batch 8 --lr 1.5e-3 --steps 2000 --max-minutes 12 \
    --out "$W/vae.safetensors"
rf-world --quiet encode --vae "$W/vae.safetensors" --videos 800 --out "$W/latents.safetensors"
rf-world --quiet teacher --data "$W/latents.safetensors" --steps 3000 --max-minutes 25 --out "$W/teacher.safetensors"
rf-world --quiet student --data "$W/latents.safetensors" --teacher "$W/teacher.safetensors" --steps 400 \
    --max-minutes 10 --out "$W/student.safetensors"
rf-world --quiet model-dir --vae "$W/vae.safetensors" --dit "$W/student.safetensors" --out "$W/model" \
    --note "causal student fine-tuned from the teacher with teacher forcing through the streaming cache"
rf-export onnx --model-dir "$W/model" --out engines/procedural-world-64
