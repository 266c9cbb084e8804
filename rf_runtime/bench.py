"""``rf-bench``: what a stream costs, measured the same way on every backend, with every count named.

Each backend runs in a fresh process (so its load time and peak memory are its own), streams
``chunks`` chunks of one prompt and records, per chunk, the wall time and its split into denoise
(the denoising steps + the clean-context cache pass, device synchronised) and decode (VAE, frames
on the host). ``summarize`` turns that into the numbers below; ``DEFINITIONS`` says what each counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import InputError
from rf_runtime.schema import as_int

BENCH_VERSION = 1
EARLY_CHUNK, LATE_CHUNK, HALF_WIDTH = 10, 200, 2  # flat-cost check: mean of chunks 8..12 against 198..202

DEFINITIONS = {
    "frames": "output video frames handed to the caller: 9 for chunk 0, 12 for every later chunk (16 fps video)",
    "load_s": "wall time to load the model or bundle (Streamer.from_checkpoint / from_engine)",
    "time_to_first_frame_s": "wall time from Streamer.open(prompt) (prompt encoding included) until chunk 0's "
                             "frames are on the host",
    "warmup_s": "load_s + time_to_first_frame_s: from nothing to the first frame",
    "stream_s": "wall time from Streamer.open(prompt) until the last chunk's frames are on the host",
    "latency_p50_s / latency_p99_s": "percentiles (linear interpolation) of the per-chunk wall time "
                                     "(noise + denoise + cache pass + decode) over chunks 1..n-1 (chunk 0 excluded)",
    "end_to_end_fps": "frames / stream_s: video frames per wall second, prompt encoding and VAE decode included, "
                      "model load excluded",
    "steady_fps": "frames of chunks 1..n-1 / their summed wall time: the sustained rate once streaming",
    "denoise_fps": "frames / summed denoise time: video frames per second of the 4 denoising steps + cache pass "
                   "alone, without VAE decode, noise drawing and prompt encoding",
    "realtime_factor": "end_to_end_fps / the video's fps (16): above 1 the stream keeps up with playback",
    "flat_cost": "per-chunk cost of chunks 8..12 against chunks 198..202 (or the last five if fewer were run): "
                 "mean and median wall time, and median process CPU time (all threads; less sensitive to other "
                 "load on the machine); late / early is about 1 when the cost does not grow with the stream; "
                 "with fewer than 18 chunks the two windows overlap, 'comparable' is false and the ratios are NaN",
    "cpu_s": "process CPU time (time.process_time, every thread of the process) spent making a chunk",
    "peak_rss_mib": "peak resident memory of the process that ran this backend (getrusage ru_maxrss)",
}


@dataclass(frozen=True)
class BenchRun:
    """One backend to benchmark. kind: 'engine' (a bundle, onnxruntime) or 'torch' (a model directory).
    threads: torch's intra-op threads (None: torch's default); onnxruntime keeps its own default."""

    kind: str
    path: str
    checkpoint: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(per_chunk: list[tuple[float, float, float, int, float]], *, load_s: float, ttff_s: float,
              stream_s: float, fps: int) -> dict:
    """Numbers of one run from its per-chunk (seconds, denoise_seconds, decode_seconds, frames, cpu_seconds)."""
    if not per_chunk:
        raise InputError("no chunks were run: pass chunks >= 1")
    seconds, denoise, decode, frames, cpu = (np.asarray(c, np.float64) for c in zip(*per_chunk))
    n = len(per_chunk)
    steady = slice(1, None) if n > 1 else slice(None)
    total_frames = int(frames.sum())

    def window(center: int) -> list[int]:
        center = max(1 + HALF_WIDTH, min(center, n - 1 - HALF_WIDTH)) if n > 1 + 2 * HALF_WIDTH else n // 2
        return [i for i in range(center - HALF_WIDTH, center + HALF_WIDTH + 1) if 0 <= i < n]

    early, late = window(EARLY_CHUNK), window(LATE_CHUNK)

    comparable = not set(early) & set(late)  # too few chunks: the two windows share chunks

    def cost(values, stat):
        e, l_ = float(stat(values[early])), float(stat(values[late]))
        return e, l_, l_ / e if e > 0 and comparable else float("nan")

    mean, median, cpu_median = cost(seconds, np.mean), cost(seconds, np.median), cost(cpu, np.median)
    return {
        "chunks": n, "frames": total_frames,
        "load_s": load_s, "time_to_first_frame_s": ttff_s, "warmup_s": load_s + ttff_s, "stream_s": stream_s,
        "latency_p50_s": percentile(seconds[steady], 50), "latency_p99_s": percentile(seconds[steady], 99),
        "latency_mean_s": float(seconds[steady].mean()),
        "denoise_p50_s": percentile(denoise[steady], 50), "decode_p50_s": percentile(decode[steady], 50),
        "denoise_s": float(denoise.sum()), "decode_s": float(decode.sum()),
        "end_to_end_fps": total_frames / stream_s,
        "steady_fps": float(frames[steady].sum() / seconds[steady].sum()),
        "denoise_fps": total_frames / float(denoise.sum()),
        "realtime_factor": total_frames / stream_s / fps,
        "flat_cost": {"early_chunks": [early[0], early[-1]], "late_chunks": [late[0], late[-1]],
                      "comparable": comparable,
                      "early_mean_s": mean[0], "late_mean_s": mean[1], "late_over_early": mean[2],
                      "early_median_s": median[0], "late_median_s": median[1], "late_over_early_median": median[2],
                      "early_cpu_median_s": cpu_median[0], "late_cpu_median_s": cpu_median[1],
                      "late_over_early_cpu": cpu_median[2]},
        "per_chunk": {"seconds": seconds.tolist(), "denoise_s": denoise.tolist(), "decode_s": decode.tolist(),
                      "frames": frames.astype(int).tolist(), "cpu_s": cpu.tolist()},
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_one(run: BenchRun, *, chunks: int, prompt: str, seed: int) -> dict:
    """Load, stream ``chunks`` chunks and summarise, in this process."""
    from rf_runtime.streamer import Streamer

    start = time.perf_counter()
    if run.threads:
        import torch

        torch.set_num_threads(run.threads)
    if run.kind == "engine":
        streamer = Streamer.from_engine(run.path, device=run.device)
    else:
        streamer = Streamer.from_checkpoint(run.path, run.checkpoint, device=run.device, dtype=run.dtype)
    load_s = time.perf_counter() - start
    per_chunk, ttff_s = [], None
    opened = time.perf_counter()
    stream = streamer.open(prompt, seed=seed)
    for _ in range(chunks):
        cpu = time.process_time()
        chunk = next(stream)
        cpu = time.process_time() - cpu
        if ttff_s is None:
            ttff_s = time.perf_counter() - opened
        per_chunk.append((chunk.seconds, chunk.denoise_seconds, chunk.decode_seconds, len(chunk.frames), cpu))
    stream_s = time.perf_counter() - opened
    be, info = streamer.backend, streamer.info
    geometry = {k: v for k, v in be.geometry().items() if k != "vae_cache"}
    geometry["frame_hw"] = list(info.frame_hw)
    result = {"run": dataclasses.asdict(run), **be.describe(), "geometry": geometry,
              **summarize(per_chunk, load_s=load_s, ttff_s=ttff_s, stream_s=stream_s, fps=info.fps),
              "peak_rss_mib": peak_rss_mib()}
    torch = sys.modules.get("torch")
    if torch is not None and run.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_isolated(run: BenchRun, **kwargs) -> dict:
    """``run_one`` in a fresh process, so that load time and peak memory belong to this backend alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_one, run, **kwargs).result()


def run_bench(runs: list[BenchRun], *, chunks: int = 200, prompt: str = "a red fox running through fresh snow",
              seed: int = 0, isolate: bool = True, progress=None) -> dict:
    """Benchmark every run on the same prompt and seed; returns the report (see ``DEFINITIONS``)."""
    chunks = as_int(chunks, "chunks", minimum=1)
    if not runs:
        raise InputError("nothing to benchmark: give a bundle (onnxruntime) and/or a model directory (torch)")
    for run in runs:
        if run.kind not in ("engine", "torch"):
            raise InputError(f"run kind must be 'engine' or 'torch', got {run.kind!r}")
        if run.threads is not None and (run.kind != "torch" or run.threads < 1):
            raise InputError(f"threads applies to the torch run and must be >= 1, got {run.threads!r} for {run.kind}")
        if not os.path.isdir(run.path):
            what = "engine bundle" if run.kind == "engine" else "model directory"
            raise InputError(f"{what} {run.path} does not exist")
    results = []
    for run in runs:
        if progress:
            progress(f"{run.kind}: {chunks} chunks from {run.path}")
        fn = run_isolated if isolate else run_one
        results.append(fn(run, chunks=chunks, prompt=prompt, seed=seed))
    report = {"rf_bench_version": BENCH_VERSION, "chunks": chunks, "prompt": prompt, "seed": seed,
              "host": host_info(), "definitions": DEFINITIONS, "runs": results}
    by_kind = {r["run"]["kind"]: r for r in results}
    if {"engine", "torch"} <= set(by_kind):
        e, t = by_kind["engine"], by_kind["torch"]
        report["engine_vs_torch"] = {key: e[key] / t[key] for key in ("end_to_end_fps", "steady_fps", "denoise_fps")}
    return report


def host_info() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


def write_json(report: dict, path: str | os.PathLike) -> str:
    """Write the report atomically (temporary name, then rename)."""
    from rf_runtime.files import atomic_write

    return atomic_write(path, lambda f: f.write(json.dumps(report, indent=2).encode()), what="the report")


def format_table(report: dict) -> str:
    """The report as a plain-text table, one column per backend."""
    runs = report["runs"]

    def col(fmt, get):
        return [fmt.format(*get(r)) if isinstance(get(r), tuple) else fmt.format(get(r)) for r in runs]

    rows = [
        ("backend", col("{}", lambda r: r["backend"])),
        ("device / precision", col("{} / {}", lambda r: (r["device"], r["precision"]))),
        ("torch threads", col("{}", lambda r: r.get("threads", "-"))),
        ("frames (chunks)", col("{} ({})", lambda r: (r["frames"], r["chunks"]))),
        ("load s", col("{:.3f}", lambda r: r["load_s"])),
        ("time to first frame s", col("{:.3f}", lambda r: r["time_to_first_frame_s"])),
        ("warm-up s (load + first)", col("{:.3f}", lambda r: r["warmup_s"])),
        ("chunk latency p50 / p99 s", col("{:.4f} / {:.4f}", lambda r: (r["latency_p50_s"], r["latency_p99_s"]))),
        ("  denoise / decode p50 s", col("{:.4f} / {:.4f}", lambda r: (r["denoise_p50_s"], r["decode_p50_s"]))),
        ("denoise-only fps", col("{:.1f}", lambda r: r["denoise_fps"])),
        ("end-to-end fps", col("{:.1f}", lambda r: r["end_to_end_fps"])),
        ("steady-state fps", col("{:.1f}", lambda r: r["steady_fps"])),
        ("realtime factor (16 fps)", col("{:.2f}", lambda r: r["realtime_factor"])),
        ("chunk s @ early / late", col("{:.4f} / {:.4f}", lambda r: (r["flat_cost"]["early_mean_s"],
                                                                   r["flat_cost"]["late_mean_s"]))),
        ("  chunks (early / late)", col("{}-{} / {}-{}", lambda r: (*r["flat_cost"]["early_chunks"],
                                                                  *r["flat_cost"]["late_chunks"]))),
        ("  late / early: mean, median", col("{:.3f}, {:.3f}", lambda r: (r["flat_cost"]["late_over_early"],
                                                                       r["flat_cost"]["late_over_early_median"]))),
        ("  late / early: CPU time", col("{:.3f}", lambda r: r["flat_cost"]["late_over_early_cpu"])),
        ("peak RSS MiB", col("{:.0f}", lambda r: r["peak_rss_mib"])),
    ]
    g = runs[0]["geometry"]
    width = max(len(name) for name, _ in rows) + 2
    cw = max(14, *(len(v) for _, vals in rows for v in vals)) + 2
    lines = [f"{name:<{width}}" + "".join(f"{v:>{cw}}" for v in vals) for name, vals in rows]
    lines.append(f"model: video {g['frame_hw'][0]}x{g['frame_hw'][1]}, latent {g['latent_hw']}, KV cache {g['kv']} "
                 f"(layers, batch, tokens, heads, head_dim), chunk {g['stream']['chunk_frames']} / sink "
                 f"{g['stream']['sink_frames']} / window {g['stream']['window_frames']} latent frames")
    if "engine_vs_torch" in report:
        r = report["engine_vs_torch"]
        lines.append(f"onnxruntime / torch: end-to-end {r['end_to_end_fps']:.2f}x, steady {r['steady_fps']:.2f}x, "
                     f"denoise-only {r['denoise_fps']:.2f}x")
    return "\n".join(lines)
