#!/usr/bin/env bash
# The PyTorch CUDA path at the real Wan2.1-T2V-1.3B geometry, on one GPU: random weights (speed does not
# depend on them), 480x832, the release's cache settings (chunk 3 / sink 3 / window 6 latent frames), the
# full-size Wan VAE, bf16, the static path (rf_runtime/backends/pytorch_static.py) with CUDA graphs on and off.
# Needs only torch and numpy (no install: the repository's code runs from the checkout).
#
#   bash scripts/device_check.sh OUT_DIR     # one GPU; writes OUT_DIR/graphs-on.json, graphs-off.json, summary.json
#   RF_DEVICE_CHECK_SMOKE=1 bash scripts/device_check.sh OUT_DIR   # CPU, tiny model, a few chunks (a test runs this)
#
# Budget on one H200: under 8 minutes (estimated: model written ~1 min, ~0.4 s per chunk, 203 chunks with graphs, 30 without).
set -euo pipefail
out=${1:?usage: bash scripts/device_check.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/rf-device-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

bench() { "$py" -c 'import sys; from rf_runtime.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))' "$@"; }

if [ "${RF_DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
    "$py" -m rf_runtime.testing "$work/model" > /dev/null
    model=(--model-dir "$work/model")
    run=(--device cpu --dtype float32 --torch-threads 1)
    on=(--cuda-graphs off) chunks_on=4 chunks_off=3   # no CUDA graphs on a CPU: the plumbing only
else
    "$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "device_check.sh needs a CUDA GPU (RF_DEVICE_CHECK_SMOKE=1 runs the CPU smoke test)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
    "$py" -m rf_runtime.testing --preset wan2.1-1.3b --device cuda "$work/model"
    model=(--model-dir "$work/model" --checkpoint "$work/model/generator.pt")
    run=(--device cuda --dtype bfloat16)
    on=(--cuda-graphs on) chunks_on=203 chunks_off=30
fi

bench "${model[@]}" "${run[@]}" --static "${on[@]}" --chunks "$chunks_on" --json "$out/graphs-on.json"
bench "${model[@]}" "${run[@]}" --static --cuda-graphs off --chunks "$chunks_off" --json "$out/graphs-off.json"

"$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
summary = {}
for name in ("graphs-on", "graphs-off"):
    with open(os.path.join(out, f"{name}.json")) as f:
        r = json.load(f)["runs"][0]
    summary[name] = {k: r.get(k) for k in ("backend", "device", "precision", "cuda_graphs", "compile", "chunks",
                                           "time_to_first_frame_s", "denoise_fps", "end_to_end_fps", "steady_fps",
                                           "latency_p50_s", "latency_p99_s", "peak_gpu_mib", "peak_gpu_mib_at_chunk",
                                           "load_s")}
    summary[name]["late_over_early"] = r["flat_cost"]["late_over_early_median"]
on, off = summary["graphs-on"], summary["graphs-off"]
summary["graphs_on_over_off"] = {k: on[k] / off[k] for k in ("denoise_fps", "end_to_end_fps", "steady_fps")}
tmp = os.path.join(out, ".summary.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, os.path.join(out, "summary.json"))
print(json.dumps(summary, indent=2))
PY
