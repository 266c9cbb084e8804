#!/usr/bin/env bash
# Train the procedural-world model from nothing on CPU and export it as the default engine bundle.
# Usage (from the repository root): bash scripts/train_world.sh
# The work directory is world-work/ (git-ignored; configs/world_*.yaml point into it). These are the
# commands and numbers the shipped bundle engines/procedural-world-64 was made with (docs/notes/world.md);
# about 65 minutes of one CPU core in all, most of it time-boxed by --max-minutes.
set -euo pipefail
W=world-work
mkdir -p "$W"
rf-world --quiet vae --crop 32 --batch 8 --lr 2e-3 --steps 1500 --max-minutes 12 --out "$W/vae3.safetensors"
rf-world --quiet encode --vae "$W/vae3.safetensors" --videos 3000 --out "$W/latents.safetensors"
rf-world --quiet teacher --data "$W/latents.safetensors" --steps 2000 --max-minutes 25 --batch 16 \
    --out "$W/teacher.safetensors"
# the decoder can keep training while the DiTs train: its encoder (hence the latents) is frozen
rf-world --quiet vae --init "$W/vae3.safetensors" --decoder-only --crop 32 --batch 8 --lr 1e-3 --steps 1500 \
    --max-minutes 20 --out "$W/vae4.safetensors"
rf-world --quiet student --data "$W/latents.safetensors" --teacher "$W/teacher.safetensors" --steps 600 \
    --max-minutes 10 --batch 8 --out "$W/student.safetensors"
rf-world --quiet model-dir --vae "$W/vae3.safetensors" --dit "$W/teacher.safetensors" --out "$W/teacher-model"
rf-world --quiet model-dir --vae "$W/vae3.safetensors" --dit "$W/student.safetensors" --out "$W/student-model"
rf-world prompts --out configs/world_prompts.txt
rf-train --config configs/world_redmd.yaml --measure-reward 4   # -> reward.motion mean/std in the config
rf-train --config configs/world_redmd.yaml --quiet                # Re-DMD, 300 steps
rf-train --config configs/world_dmd.yaml --quiet                  # plain DMD, the ablation baseline
rf-world --quiet model-dir --vae "$W/vae4.safetensors" --dit "$W/student.safetensors" --out "$W/student-model-v4" \
    --note "procedural-world-64: causal student (teacher-forced through the streaming cache) + 300 Re-DMD steps (motion reward, beta 0.5), see docs/notes/world.md"
rf-export onnx --model-dir "$W/student-model-v4" --checkpoint "$W/redmd/checkpoint_000300.safetensors" \
    --out engines/procedural-world-64 --training-stage re-dmd --name procedural-world-64 --longest-tested-frames 960
