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
    "(noise + denoise + cache pass + decode; with overlap: the wall time of the call that hands the chunk "
    "out, in which its decode ran beside its cache pass and the next chunk's steps) over chunks 1..n-1 "
    "(chunk 0 excluded)",
    "overlap": "the engine run decoded chunk n in a second thread while chunk n+1 denoised (Backend.overlap; "
    "--overlap auto: on for onnxruntime CPU with >= 2 usable cores and no --threads; off with --profile and "
    "for --sessions runs); then the per-chunk denoise time (its steps, run in the call before, + its cache "
    "pass) and decode time (in the decode thread) overlap, and their sum exceeds the chunk's wall time",
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
    "peak_gpu_mib_at_chunk": "CUDA runs: torch.cuda.max_memory_allocated() after chunk 10 and after chunk 200 "
    "(equal when the stream's memory is allocated once)",
    "profile": "--profile, engine runs: per graph over chunks 1..n-1, the calls and wall ms per chunk, MFLOP per "
    "call (2 x multiply-adds of MatMul / Gemm / Conv / ConvTranspose / Einsum, from the graph's shapes as "
    "onnxruntime loads it; element-wise ops not counted), achieved GFLOP/s, and its share of the peak of "
    "the cores its session may use (threads x one core's float32 GEMM rate, measured in the same "
    "process with onnxruntime's MatMul); for one-thread sessions also the rate by the calling "
    "thread's CPU time against the peak measured the same way (steadier on a shared machine); "
    "host ms = chunk wall time outside every graph call",
    "sessions": "--sessions N: N streams of the same prompt (seeds seed..seed+N-1) on one loaded model at once, each "
    "in its own thread, started together; aggregate_fps = all frames / wall time until the last "
    "stream ends; per_session_fps = each stream's frames / its own wall time; latency over every "
    "stream's chunks 1..n-1; cpu_ms_per_frame = process CPU time (all threads) / frames, which stays "
    "flat with N when the streams do not slow each other down (steadier than wall time on a shared "
    "machine); onnxruntime sessions get one intra-op thread each unless --threads is given; mode "
    "'threads' is that, mode 'batched' (a bundle exported with --batch-sizes, N > 1) deals the N streams "
    "out to one thread per usable core ('workers'), each stepping its share together (rf_runtime.batching: "
    "one call of each graph per chunk boundary for up to the largest batch size) on one-thread sessions "
    "(one worker: one thread, the default threading); its chunk latency is the wall time of one such "
    "step; 'x one' is against one stream alone (mode threads, N = 1)",
}


@dataclass(frozen=True)
class BenchRun:
    """One backend to benchmark. kind: 'engine' (a bundle, onnxruntime) or 'torch' (a model directory).
    threads: torch's intra-op threads (None: torch's default).
    cpu_threads / spinning: the onnxruntime sessions' intra-op threads and spinning (None: chosen from
    the machine, ``rf_runtime.backends.engine.cpu_threads``; with several sessions at once, 1)."""

    kind: str
    path: str
    checkpoint: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    cpu_threads: int | None = None
    spinning: bool = False
    overlap: bool | None = None  # engine: decode beside the next chunk's denoising (None: chosen at load)
    static: bool = False  # torch: the fast path (rf_runtime.backends.pytorch_static)
    cuda_graphs: bool | None = None  # torch static: None = on for CUDA
    compile: bool = False  # torch static: torch.compile the DiT and VAE steps

    def engine_threads(self, concurrent: bool = False):
        """The onnxruntime threading of this run; ``concurrent`` (streams at once): one thread by default."""
        from rf_runtime.runners.onnxruntime_runner import CpuThreads

        if self.cpu_threads is None and not self.spinning:
            return 1 if concurrent else None
        return CpuThreads(self.cpu_threads or 1, self.spinning)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(
    per_chunk: list[tuple[float, float, float, int, float]],
    *,
    load_s: float,
    ttff_s: float,
    stream_s: float,
    fps: int,
) -> dict:
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
        "chunks": n,
        "frames": total_frames,
        "load_s": load_s,
        "time_to_first_frame_s": ttff_s,
        "warmup_s": load_s + ttff_s,
        "stream_s": stream_s,
        "latency_p50_s": percentile(seconds[steady], 50),
        "latency_p99_s": percentile(seconds[steady], 99),
        "latency_mean_s": float(seconds[steady].mean()),
        "denoise_p50_s": percentile(denoise[steady], 50),
        "decode_p50_s": percentile(decode[steady], 50),
        "denoise_s": float(denoise.sum()),
        "decode_s": float(decode.sum()),
        "end_to_end_fps": total_frames / stream_s,
        "steady_fps": float(frames[steady].sum() / seconds[steady].sum()),
        "denoise_fps": total_frames / float(denoise.sum()),
        "realtime_factor": total_frames / stream_s / fps,
        "flat_cost": {
            "early_chunks": [early[0], early[-1]],
            "late_chunks": [late[0], late[-1]],
            "comparable": comparable,
            "early_mean_s": mean[0],
            "late_mean_s": mean[1],
            "late_over_early": mean[2],
            "early_median_s": median[0],
            "late_median_s": median[1],
            "late_over_early_median": median[2],
            "early_cpu_median_s": cpu_median[0],
            "late_cpu_median_s": cpu_median[1],
            "late_over_early_cpu": cpu_median[2],
        },
        "per_chunk": {
            "seconds": seconds.tolist(),
            "denoise_s": denoise.tolist(),
            "decode_s": decode.tolist(),
            "frames": frames.astype(int).tolist(),
            "cpu_s": cpu.tolist(),
        },
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def load(run: BenchRun, concurrent: bool = False, serial: bool = False):
    """The run's Streamer. concurrent: several streams at once (one-thread sessions); serial: every graph
    call one after the other (--profile, batched steps). Either turns the decode overlap off."""
    from rf_runtime.streamer import Streamer

    if run.threads:
        import torch

        torch.set_num_threads(run.threads)
    if run.kind == "engine":
        return Streamer.from_engine(
            run.path,
            device=run.device,
            threads=run.engine_threads(concurrent),
            overlap=False if concurrent or serial else run.overlap,
        )
    if run.static:
        return Streamer.from_checkpoint(
            run.path,
            run.checkpoint,
            device=run.device,
            dtype=run.dtype,
            static=True,
            cuda_graphs=run.cuda_graphs,
            compile=run.compile,
        )
    return Streamer.from_checkpoint(run.path, run.checkpoint, device=run.device, dtype=run.dtype)


GPU_MEMORY_CHUNKS = (10, 200)  # peak GPU memory is read after these chunks (flat memory: equal)


def run_one(run: BenchRun, *, chunks: int, prompt: str, seed: int, profile: bool = False) -> dict:
    """Load, stream ``chunks`` chunks and summarise, in this process. profile: also time every graph call
    and count its FLOPs (``rf_runtime.profile``; engine runs only), over chunks 1..n-1."""
    start = time.perf_counter()
    streamer = load(run, serial=profile)  # the profile times graph calls one after another
    load_s = time.perf_counter() - start
    timer = _start_profile(streamer.backend) if profile else None
    per_chunk, ttff_s, gpu_peaks = [], None, {}
    cuda = sys.modules["torch"].cuda if run.device.startswith("cuda") else None
    opened = time.perf_counter()
    stream = streamer.open(prompt, seed=seed)
    for _ in range(chunks):
        cpu = time.process_time()
        chunk = next(stream)
        cpu = time.process_time() - cpu
        if cuda is not None and chunk.index in GPU_MEMORY_CHUNKS:
            gpu_peaks[str(chunk.index)] = cuda.max_memory_allocated() / 2**20
        if ttff_s is None:
            ttff_s = time.perf_counter() - opened
            if timer is not None:
                after_first = timer.snapshot()
        per_chunk.append((chunk.seconds, chunk.denoise_seconds, chunk.decode_seconds, len(chunk.frames), cpu))
    stream_s = time.perf_counter() - opened
    be, info = streamer.backend, streamer.info
    geometry = {k: v for k, v in be.geometry().items() if k != "vae_cache"}
    geometry["frame_hw"] = list(info.frame_hw)
    result = {
        "run": dataclasses.asdict(run),
        **be.describe(),
        "geometry": geometry,
        **summarize(per_chunk, load_s=load_s, ttff_s=ttff_s, stream_s=stream_s, fps=info.fps),
        "peak_rss_mib": peak_rss_mib(),
    }
    torch = sys.modules.get("torch")
    if torch is not None and run.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_mib_at_chunk"] = gpu_peaks
    if timer is not None:
        result["profile"] = _finish_profile(timer, after_first, per_chunk, be)
    return result


def _start_profile(backend):
    from rf_runtime.profile import GraphTimer

    if not hasattr(backend, "runners"):
        raise InputError(
            "--profile times the graphs of an engine bundle: give --bundle (the torch run has no graphs)"
        )
    return GraphTimer(dict(backend.runners))


def _finish_profile(timer, after_first, per_chunk, backend) -> dict:
    from rf_runtime.profile import graph_flops, profile_report, sgemm_peak

    timer.stop()
    seconds, calls, cpu = timer.snapshot()
    seconds = {g: seconds[g] - after_first[0][g] for g in seconds}
    calls = {g: calls[g] - after_first[1][g] for g in calls}
    cpu = {g: cpu[g] - after_first[2][g] for g in cpu}
    chunks = max(len(per_chunk) - 1, 1)
    chunk_s = sum(c[0] for c in per_chunk[1:]) if len(per_chunk) > 1 else per_chunk[0][0]
    runners = backend.runners
    threads = {g: getattr(r, "threads", None) for g, r in runners.items()}
    graphs = {g: graph_flops(r.path) for g, r in runners.items() if hasattr(r, "path")}
    peak = sgemm_peak()
    return profile_report(
        graphs,
        chunks=chunks,
        chunk_seconds=chunk_s,
        seconds=seconds,
        calls=calls,
        cpu=cpu,
        threads={g: t.intra_op for g, t in threads.items() if t is not None},
        peak_per_core=peak["gflops_per_core"],
        peak_per_core_cpu=peak["gflops_per_core_cpu"],
    )


def run_together(n: int, work) -> tuple[float, float]:
    """``work(i, ready)`` for i in 0..n-1, each in its own thread (onnxruntime releases the GIL while a
    graph runs); each calls ``ready()`` once set up, and all go on together from there. Returns the wall
    and the process CPU seconds from that moment until the last has finished; the first exception of
    any thread is raised here."""
    import threading

    barrier = threading.Barrier(n + 1)
    errors: list = []

    def body(i):
        try:
            work(i, barrier.wait)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    cpu, start = time.process_time(), time.perf_counter()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if errors:
        raise errors[0]
    return wall, cpu


def run_sessions(run: BenchRun, *, sessions: int, chunks: int, prompt: str, seed: int) -> dict:
    """``sessions`` streams at once on one loaded model, each driven by its own thread, every stream
    ``chunks`` chunks; streams start together."""
    streamer = load(run, concurrent=True)
    results: list = [None] * sessions

    def work(i, ready):
        stream = streamer.open(prompt, seed=seed + i)
        ready()
        opened, per_chunk = time.perf_counter(), []
        for _ in range(chunks):
            chunk = next(stream)
            per_chunk.append((chunk.seconds, len(chunk.frames)))
        results[i] = (opened, time.perf_counter(), per_chunk)

    _, cpu = run_together(sessions, work)
    start, end = min(r[0] for r in results), max(r[1] for r in results)
    latencies = [s for r in results for s, _ in r[2][1:]] or [r[2][0][0] for r in results]
    per_session = [sum(f for _, f in r[2]) / (r[1] - r[0]) for r in results]
    frames = sum(f for r in results for _, f in r[2])
    return {
        "mode": "threads",
        "sessions": sessions,
        "chunks_per_session": chunks,
        "frames": frames,
        "wall_s": end - start,
        "aggregate_fps": frames / (end - start),
        "per_session_fps": per_session,
        "per_session_fps_mean": float(np.mean(per_session)),
        "cpu_ms_per_frame": cpu / frames * 1e3,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        **streamer.backend.describe(),
    }


def batch_workers(sessions: int) -> int:
    """How many threads step the streams of a batched run: one per usable core, at most one per stream."""
    from rf_runtime.runners.onnxruntime_runner import usable_cores

    return max(1, min(usable_cores(), sessions))


def run_batched(run: BenchRun, *, sessions: int, chunks: int, prompt: str, seed: int) -> dict:
    """``sessions`` streams stepped together (``rf_runtime.batching.next_chunks``: one call of each graph
    per chunk boundary for up to the bundle's largest batch size), ``chunks`` each. The streams are
    dealt out to one thread per usable core (``batch_workers``), each thread batching its own share,
    with one-thread sessions, so the batched calls use every core; on one core, one thread with the
    default threading."""
    from rf_runtime.batching import next_chunks

    workers = batch_workers(sessions)
    streamer = load(run, concurrent=workers > 1, serial=True)
    streams = [streamer.open(prompt, seed=seed + i) for i in range(sessions)]
    shares = [list(range(sessions))[w::workers] for w in range(workers)]  # stream indices of each thread
    steps: list = [[] for _ in range(workers)]  # per thread: (wall s of the call, frames of its streams)

    def work(w, ready):
        mine = [streams[i] for i in shares[w]]
        ready()
        for _ in range(chunks):
            t = time.perf_counter()
            made = next_chunks(mine)
            for c in made:
                if isinstance(c, BaseException):
                    raise c
            steps[w].append((time.perf_counter() - t, [len(c.frames) for c in made]))

    wall, cpu = run_together(workers, work)
    frames = sum(sum(f) for mine in steps for _, f in mine)
    latencies = [s for mine in steps for s, _ in mine[1:]] or [mine[0][0] for mine in steps]
    per_session = [0.0] * sessions
    for w, mine in enumerate(steps):
        for j, i in enumerate(shares[w]):
            per_session[i] = sum(f[j] for _, f in mine) / wall
    return {
        "mode": "batched",
        "batch_sizes": list(streamer.backend.batch_sizes()),
        "workers": workers,
        "sessions": sessions,
        "chunks_per_session": chunks,
        "frames": frames,
        "wall_s": wall,
        "aggregate_fps": frames / wall,
        "per_session_fps": per_session,
        "per_session_fps_mean": float(np.mean(per_session)),
        "cpu_ms_per_frame": cpu / frames * 1e3,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        **streamer.backend.describe(),
    }


def bundle_batch_sizes(path: str) -> tuple[int, ...]:
    """The batch sizes of the bundle at ``path`` (its manifest), without loading it."""
    import json

    from rf_runtime.bundle import MANIFEST, batch_sizes

    with open(os.path.join(path, MANIFEST)) as f:
        return batch_sizes(json.load(f))


def run_isolated(run: BenchRun, fn=None, **kwargs) -> dict:
    """``fn`` (``run_one``) in a fresh process, so that load time and peak memory belong to this backend alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn or run_one, run, **kwargs).result()


def run_bench(
    runs: list[BenchRun],
    *,
    chunks: int = 200,
    prompt: str = "a red fox running through fresh snow",
    seed: int = 0,
    isolate: bool = True,
    progress=None,
    profile: bool = False,
    sessions: tuple[int, ...] = (),
) -> dict:
    """Benchmark every run on the same prompt and seed; returns the report (see ``DEFINITIONS``).
    profile: add each engine run's per-graph profile (``rf_runtime.profile``). sessions: also run
    each of these numbers of streams at once (``run_sessions``), each count in its own process."""
    chunks = as_int(chunks, "chunks", minimum=1)
    if not runs:
        raise InputError("nothing to benchmark: give a bundle (onnxruntime) and/or a model directory (torch)")
    for run in runs:
        if run.kind not in ("engine", "torch"):
            raise InputError(f"run kind must be 'engine' or 'torch', got {run.kind!r}")
        if run.threads is not None and (run.kind != "torch" or run.threads < 1):
            raise InputError(
                f"threads applies to the torch run and must be >= 1, got {run.threads!r} for {run.kind}"
            )
        if (run.static or run.cuda_graphs is not None or run.compile) and run.kind != "torch":
            raise InputError("--static, --cuda-graphs and --compile apply to the torch run (--model-dir)")
        if (run.cuda_graphs is not None or run.compile) and not run.static:
            raise InputError("--cuda-graphs and --compile belong to the static torch path: add --static")
        if (run.cpu_threads is not None or run.spinning) and run.kind != "engine":
            raise InputError("onnxruntime threads and spinning apply to the engine run (--bundle)")
        if run.overlap is not None and run.kind != "engine":
            raise InputError("--overlap applies to the engine run (--bundle); the torch run decodes serially")
        if run.overlap and profile:
            raise InputError(
                "--profile times every graph call one after another, so it runs without the decode overlap: "
                "drop --overlap on (or run the two separately)"
            )
        if run.cpu_threads is not None and run.cpu_threads < 1:
            raise InputError(f"onnxruntime threads must be >= 1, got {run.cpu_threads!r}")
        if not os.path.isdir(run.path):
            what = "engine bundle" if run.kind == "engine" else "model directory"
            raise InputError(f"{what} {run.path} does not exist")
    if any(not isinstance(n, int) or n < 1 for n in sessions):
        raise InputError(f"sessions must be positive integers, got {list(sessions)}")
    if profile and not any(r.kind == "engine" for r in runs):
        raise InputError("--profile times the graphs of an engine bundle: give --bundle")
    results, concurrent = [], []
    for run in runs:
        if progress:
            progress(f"{run.kind}: {chunks} chunks from {run.path}")
        kwargs = dict(chunks=chunks, prompt=prompt, seed=seed, profile=profile and run.kind == "engine")
        results.append(run_isolated(run, **kwargs) if isolate else run_one(run, **kwargs))
        for n in sessions:
            if progress:
                progress(f"{run.kind}: {n} sessions at once, {chunks} chunks each")
            kwargs = dict(sessions=n, chunks=chunks, prompt=prompt, seed=seed)
            modes = [run_sessions]
            if run.kind == "engine" and n > 1 and max(bundle_batch_sizes(run.path)) > 1:
                modes.append(run_batched)  # the bundle's batched graphs, side by side with the threads
            for fn in modes:
                if progress and fn is run_batched:
                    progress(f"{run.kind}: {n} sessions stepped together, {chunks} chunks each")
                concurrent.append(
                    {
                        "run": dataclasses.asdict(run),
                        **(run_isolated(run, fn, **kwargs) if isolate else fn(run, **kwargs)),
                    }
                )
    report = {
        "rf_bench_version": BENCH_VERSION,
        "chunks": chunks,
        "prompt": prompt,
        "seed": seed,
        "host": host_info(),
        "definitions": DEFINITIONS,
        "runs": results,
    }
    if concurrent:
        report["sessions"] = concurrent
        for run in runs:
            mine = [c for c in concurrent if c["run"] == dataclasses.asdict(run)]
            one = next((c for c in mine if c["sessions"] == 1 and c["mode"] == "threads"), None)
            for c in mine:
                c["aggregate_over_one_session"] = (
                    c["aggregate_fps"] / one["aggregate_fps"] if one else float("nan")
                )
    by_kind = {r["run"]["kind"]: r for r in results}
    if {"engine", "torch"} <= set(by_kind):
        e, t = by_kind["engine"], by_kind["torch"]
        report["engine_vs_torch"] = {
            key: e[key] / t[key] for key in ("end_to_end_fps", "steady_fps", "denoise_fps")
        }
    return report


def host_info() -> dict:
    from rf_runtime.runners.onnxruntime_runner import usable_cores

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average": list(load) if load else None,
    }


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
        ("decode overlap", col("{}", lambda r: {True: "on", False: "off"}.get(r.get("overlap"), "-"))),
        ("frames (chunks)", col("{} ({})", lambda r: (r["frames"], r["chunks"]))),
        ("load s", col("{:.3f}", lambda r: r["load_s"])),
        ("time to first frame s", col("{:.3f}", lambda r: r["time_to_first_frame_s"])),
        ("warm-up s (load + first)", col("{:.3f}", lambda r: r["warmup_s"])),
        (
            "chunk latency p50 / p99 s",
            col("{:.4f} / {:.4f}", lambda r: (r["latency_p50_s"], r["latency_p99_s"])),
        ),
        (
            "  denoise / decode p50 s",
            col("{:.4f} / {:.4f}", lambda r: (r["denoise_p50_s"], r["decode_p50_s"])),
        ),
        ("denoise-only fps", col("{:.1f}", lambda r: r["denoise_fps"])),
        ("end-to-end fps", col("{:.1f}", lambda r: r["end_to_end_fps"])),
        ("steady-state fps", col("{:.1f}", lambda r: r["steady_fps"])),
        ("realtime factor (16 fps)", col("{:.2f}", lambda r: r["realtime_factor"])),
        (
            "chunk s @ early / late",
            col("{:.4f} / {:.4f}", lambda r: (r["flat_cost"]["early_mean_s"], r["flat_cost"]["late_mean_s"])),
        ),
        (
            "  chunks (early / late)",
            col("{}-{} / {}-{}", lambda r: (*r["flat_cost"]["early_chunks"], *r["flat_cost"]["late_chunks"])),
        ),
        (
            "  late / early: mean, median",
            col(
                "{:.3f}, {:.3f}",
                lambda r: (r["flat_cost"]["late_over_early"], r["flat_cost"]["late_over_early_median"]),
            ),
        ),
        ("  late / early: CPU time", col("{:.3f}", lambda r: r["flat_cost"]["late_over_early_cpu"])),
        ("peak RSS MiB", col("{:.0f}", lambda r: r["peak_rss_mib"])),
    ]
    if any("peak_gpu_mib" in r for r in runs):

        def at(r, c):
            return f"{r.get('peak_gpu_mib_at_chunk', {}).get(c, float('nan')):.0f}"

        rows.append(("peak GPU MiB @ chunk 10 / 200", col("{} / {}", lambda r: (at(r, "10"), at(r, "200")))))
    if any(r.get("backend") == "torch-static" for r in runs):
        rows.append(
            (
                "CUDA graphs / compile",
                col("{} / {}", lambda r: (r.get("cuda_graphs", "-"), r.get("compile", "-"))),
            )
        )
    g = runs[0]["geometry"]
    width = max(len(name) for name, _ in rows) + 2
    cw = max(14, *(len(v) for _, vals in rows for v in vals)) + 2
    lines = [f"{name:<{width}}" + "".join(f"{v:>{cw}}" for v in vals) for name, vals in rows]
    lines.append(
        f"model: video {g['frame_hw'][0]}x{g['frame_hw'][1]}, latent {g['latent_hw']}, KV cache {g['kv']} "
        f"(layers, batch, tokens, heads, head_dim), chunk {g['stream']['chunk_frames']} / sink "
        f"{g['stream']['sink_frames']} / window {g['stream']['window_frames']} latent frames"
    )
    for r in runs:
        if "profile" in r:
            from rf_runtime.profile import format_profile

            lines.append(f"profile ({r['backend']}):")
            lines.append(format_profile(r["profile"]))
    if report.get("sessions"):
        lines.append(
            f"{'sessions':>8}{'aggregate fps':>15}{'x one':>7}{'per-session fps mean / min':>28}"
            f"{'p50 / p99 chunk s':>20}{'CPU ms/frame':>14}  mode        backend"
        )
        for c in report["sessions"]:
            mode = c["mode"] + (f" x{c['workers']}" if "workers" in c else "")
            per = f"{c['per_session_fps_mean']:.1f} / {min(c['per_session_fps']):.1f}"
            lines.append(
                f"{c['sessions']:>8}{c['aggregate_fps']:>15.1f}{c['aggregate_over_one_session']:>7.2f}"
                f"{per:>28}{c['latency_p50_s']:>10.4f} / {c['latency_p99_s']:.4f}"
                f"{c['cpu_ms_per_frame']:>14.2f}  {mode:<11} {c['backend']}"
            )
    if "engine_vs_torch" in report:
        r = report["engine_vs_torch"]
        lines.append(
            f"onnxruntime / torch: end-to-end {r['end_to_end_fps']:.2f}x, steady {r['steady_fps']:.2f}x, "
            f"denoise-only {r['denoise_fps']:.2f}x"
        )
    return "\n".join(lines)
