#!/usr/bin/env bash
# Train the procedural-world model from nothing on CPU and export it as the default engine bundle.
# Usage (from the repository root): bash scripts/train_world.sh
# The work directory is world-work/ (git-ignored; configs/world_*.yaml point into it). These are the
# commands the shipped bundle engines/procedural-world-64 was made with (docs/notes/world.md): about
# 75 minutes of wall time on 2 CPU cores, most stages time-boxed by --max-minutes.
set -euo pipefail
W=world-work
mkdir -p "$W"
# 1. VAE (Wan architecture, dim 16, no temporal compression): 3-frame clips first (cheap steps, the
#    first frame learns fast), then 9-frame clips so frames deep in a stream reconstruct as well.
rf-world --threads 2 --quiet vae --clip-frames 3 --crop 32 --batch 8 --lr 2e-3 --steps 4000 --max-minutes 14 \
    --out "$W/vae.safetensors"
rf-world --threads 2 --quiet vae --init "$W/vae.safetensors" --clip-frames 9 --crop 32 --batch 8 --lr 1e-3 \
    --steps 700 --max-minutes 8 --out "$W/vae9.safetensors"
rf-world --threads 2 --quiet encode --vae "$W/vae9.safetensors" --videos 4000 --out "$W/latents.safetensors"
# 2. Bidirectional teacher: flow matching, 10 % of prompts dropped (for CFG), shape cells weighted 1 + 3.
rf-world --threads 2 --quiet teacher --data "$W/latents.safetensors" --steps 9000 --max-minutes 32 --batch 16 \
    --out "$W/teacher.safetensors"
rf-world --quiet sample --dit "$W/teacher.safetensors" --vae "$W/vae9.safetensors" --guidance 3 \
    --prompt "a red circle bouncing" --prompt "a small blue square moving left on a gray background" \
    --prompt "a big yellow triangle moving down quickly" --out "$W/teacher_samples.png"
# 3. Causal student: the teacher's weights, teacher-forced through the streaming cache.
rf-world --threads 2 --quiet student --data "$W/latents.safetensors" --teacher "$W/teacher.safetensors" \
    --steps 1200 --max-minutes 8 --batch 8 --out "$W/student.safetensors"
rf-world --quiet model-dir --vae "$W/vae9.safetensors" --dit "$W/teacher.safetensors" --out "$W/teacher-model"
rf-world --quiet model-dir --vae "$W/vae9.safetensors" --dit "$W/student.safetensors" --out "$W/student-model" \
    --note "procedural-world-64: causal student (teacher-forced through the streaming cache) + Re-DMD (motion reward, beta 0.5, CFG 3), see docs/notes/world.md"
rf-world prompts --out configs/world_prompts.txt
# 4. Re-DMD (the shipped student), and the ablation's baselines: plain DMD and Re-DMD with beta 2.
rf-train --config configs/world_redmd.yaml --measure-reward 4   # -> reward.motion mean/std in the configs
pids=()
for c in redmd dmd redmd_beta2; do   # one thread each (cpu_threads: 1): about 5 minutes together
    rf-train --config "configs/world_$c.yaml" --quiet & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done   # fails the script if any run failed
# 5. The default bundle.
rf-export onnx --model-dir "$W/student-model" --checkpoint "$W/redmd/checkpoint_000600.safetensors" \
    --out engines/procedural-world-64 --training-stage re-dmd --name procedural-world-64 --longest-tested-frames 960
