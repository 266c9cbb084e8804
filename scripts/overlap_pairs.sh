#!/usr/bin/env bash
# One stream with the decode overlap off against on (docs/notes/speed.md, "Overlap"), side by side:
# PAIRS pairs of `rf-bench --bundle BUNDLE --chunks CHUNKS`, alternated off, on, off, on, ..., then the
# medians of each mode and of the paired on / off ratios (end-to-end fps, p50 chunk latency, process CPU
# per chunk). Run it on an otherwise idle machine, not pinned: the overlap needs two usable cores.
#
#   bash scripts/overlap_pairs.sh OUT_DIR [PAIRS] [BUNDLE] [CHUNKS]
#       defaults: 5 pairs, engines/procedural-world-64, 203 chunks (~1 min per pair on 2 cores)
#   writes OUT_DIR/pair<i>-off.json, pair<i>-on.json (rf-bench reports) and OUT_DIR/summary.json
set -euo pipefail
out=${1:?usage: bash scripts/overlap_pairs.sh OUT_DIR [PAIRS] [BUNDLE] [CHUNKS]}
root=$(cd "$(dirname "$0")/.." && pwd)
pairs=${2:-5}
bundle=${3:-$root/engines/procedural-world-64}
chunks=${4:-203}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

bench() { "$py" -c 'import sys; from rf_runtime.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))' "$@"; }

"$py" -c 'from rf_runtime.runners.onnxruntime_runner import usable_cores as u; n = u(); print(f"usable cores: {n}")
if n < 2: print("warning: fewer than 2 usable cores: the overlap has no second core to use")'
echo "load before: $(cat /proc/loadavg 2>/dev/null || uptime)"
for i in $(seq 1 "$pairs"); do
    for mode in off on; do
        bench --bundle "$bundle" --chunks "$chunks" --overlap "$mode" --json "$out/pair$i-$mode.json" \
            | { grep -E "^(decode overlap|end-to-end fps|chunk latency)" || true; } | sed "s/^/pair $i $mode: /"
    done
done
echo "load after: $(cat /proc/loadavg 2>/dev/null || uptime)"

"$py" - "$out" "$pairs" <<'PY'
import json, os, statistics, sys

out, pairs = sys.argv[1], int(sys.argv[2])


def read(i, mode):
    with open(os.path.join(out, f"pair{i}-{mode}.json")) as f:
        r = json.load(f)["runs"][0]
    assert r["overlap"] is (mode == "on"), (i, mode, r["overlap"])
    cpu = r["per_chunk"]["cpu_s"][1:] or r["per_chunk"]["cpu_s"]
    return {
        "end_to_end_fps": r["end_to_end_fps"],
        "latency_p50_ms": r["latency_p50_s"] * 1e3,
        "cpu_ms_per_chunk": statistics.median(cpu) * 1e3,
        "vae_threads": r["cpu_threads"]["vae_decode"]["intra_op"],
    }


rows = [{m: read(i, m) for m in ("off", "on")} for i in range(1, pairs + 1)]
keys = ("end_to_end_fps", "latency_p50_ms", "cpu_ms_per_chunk")
summary = {
    "pairs": rows,
    "median": {m: {k: statistics.median(r[m][k] for r in rows) for k in keys} for m in ("off", "on")},
    "median_ratio_on_over_off": {k: statistics.median(r["on"][k] / r["off"][k] for r in rows) for k in keys},
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"{'pair':>4} {'fps off':>8} {'fps on':>8} {'on/off':>7} {'p50 ms off':>11} {'p50 ms on':>10}")
for i, r in enumerate(rows, 1):
    off, on = r["off"], r["on"]
    print(
        f"{i:>4} {off['end_to_end_fps']:>8.1f} {on['end_to_end_fps']:>8.1f} "
        f"{on['end_to_end_fps'] / off['end_to_end_fps']:>7.3f} {off['latency_p50_ms']:>11.1f} {on['latency_p50_ms']:>10.1f}"
    )
m, q = summary["median"], summary["median_ratio_on_over_off"]
print(
    f"median end-to-end fps: off {m['off']['end_to_end_fps']:.1f}, on {m['on']['end_to_end_fps']:.1f}; "
    f"paired on/off: fps {q['end_to_end_fps']:.3f}, p50 latency {q['latency_p50_ms']:.3f}, "
    f"CPU per chunk {q['cpu_ms_per_chunk']:.3f} (VAE threads off {rows[0]['off']['vae_threads']}, "
    f"on {rows[0]['on']['vae_threads']})"
)
print(f"summary: {os.path.join(out, 'summary.json')}")
PY
