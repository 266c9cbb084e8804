"""Command-line tools. Thin: parse arguments, call the library, report. Progress bars live here only."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rf_runtime.errors import OutputError, RFError, missing_extra

logger = logging.getLogger("rf_runtime")


def add_version(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version`` on a CLI: prints ``<prog> <rf_runtime version>``."""
    from rf_runtime import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rf-generate",
        description="Generate a video from a text prompt with a Reward Forcing model and write it as MP4 (16 fps).",
    )
    add_version(p)
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--seconds", type=float, default=5.0, help="video length in seconds (default 5)")
    p.add_argument(
        "--out", required=True, help="output .mp4 path (written to a temporary name, then renamed)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed; the same seed gives the same video (default 0)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: the engine bundle that ships with rf_runtime)")
    src.add_argument(
        "--bundle", help="engine bundle directory (manifest.json + ONNX graphs), run by onnxruntime"
    )
    src.add_argument("--engine", dest="bundle", help=argparse.SUPPRESS)  # the flag's earlier name
    src.add_argument(
        "--model-dir",
        help="Wan2.1-style model directory (config.json, DiT weights, VAE, text encoder), run by PyTorch",
    )
    src.add_argument(
        "--checkpoint",
        help="generator checkpoint on top of --model-dir (e.g. rewardforcing.pt); "
        "a directory here is taken as --model-dir",
    )
    src.add_argument("--height", type=int, help="video height (--model-dir only; default: the model's)")
    src.add_argument("--width", type=int, help="video width (--model-dir only; default: the model's)")
    src.add_argument("--device", default="cpu", help="torch device (default cpu)")
    src.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="--model-dir only (bundles carry their precision)",
    )
    src.add_argument(
        "--ema-alpha", type=float, help="EMA-Sink rate in [0, 1], 1 = a static sink (default: the model's)"
    )


def _load_streamer(args):
    import os

    from rf_runtime.streamer import Streamer

    model_dir, checkpoint = args.model_dir, args.checkpoint
    if checkpoint and os.path.isdir(checkpoint) and not model_dir:
        model_dir, checkpoint = checkpoint, None
    if args.bundle and (model_dir or checkpoint):
        raise RFError("--bundle and --model-dir/--checkpoint name two models: pass one of them")
    if not model_dir:
        if checkpoint:
            raise RFError(
                "--checkpoint needs --model-dir DIR (the directory with config.json, VAE and text encoder)"
            )
        torch_only = [
            name
            for name, value in (
                ("--height", args.height),
                ("--width", args.width),
            )
            if value is not None
        ]
        if args.dtype != "float32":
            torch_only.append("--dtype")
        if torch_only:
            raise RFError(
                f"{', '.join(torch_only)} apply to --model-dir models only: an engine bundle has a fixed "
                "size, precision and cache size; pass --model-dir DIR to change them"
            )
        from rf_runtime.bundle import default_engine_dir

        bundle = args.bundle or default_engine_dir()
        if _is_model_folder(bundle):
            raise RFError(
                f"--bundle {bundle} is a model folder, not an engine bundle: pass it as --model-dir"
            )
        logger.info("using the engine bundle %s", bundle)
        return Streamer.from_engine(bundle, device=args.device, ema_alpha=args.ema_alpha)
    settings = None
    if args.ema_alpha is not None:
        from rf_runtime import model_dir as model_folder

        card = model_folder.read_card(model_dir) if os.path.isdir(model_dir) else {}
        settings = model_folder.stream_settings(card, ema_alpha=args.ema_alpha)
    if _is_bundle(model_dir):
        raise RFError(f"--model-dir {model_dir} is an engine bundle, not a model folder: pass it as --bundle")
    return Streamer.from_checkpoint(
        model_dir,
        checkpoint,
        settings=settings,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
    )


def _is_bundle(path: str) -> bool:
    import os

    from rf_runtime.bundle import MANIFEST

    return os.path.isfile(os.path.join(path, MANIFEST))


def _is_model_folder(path: str) -> bool:
    from rf_runtime import model_dir

    return model_dir.is_model_dir(path) and not _is_bundle(path)


def _sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def run_command(prog: str, body, args, level: int = logging.WARNING) -> int:
    """Run a CLI body; an RFError becomes one line on stderr and exit status 2 (no traceback).

    SIGTERM (kill, docker stop, systemd, a scheduler's preemption) is handled like Ctrl-C, so the body's
    KeyboardInterrupt path runs: rf-generate keeps the frames made so far, rf-train saves a checkpoint,
    and no temporary file is left behind (the default SIGTERM action ends Python without cleanup)."""
    import signal
    import threading

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c) if in_main else None
    try:
        return body(args)
    except RFError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as exc:  # a full disk, a quota, a vanished folder while writing logs: one line naming the file
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"{prog}: error: {exc.strerror or exc}{where}: free some space or pick another folder",
            file=sys.stderr,
        )
        return 2
    except ImportError as exc:  # an optional dependency the command needs: one line naming the extra
        err = missing_extra(exc)
        if err is None:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a body without its own Ctrl-C path: its temporary files are already removed
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def generate_main(argv: list[str] | None = None) -> int:
    return run_command("rf-generate", _generate, _generate_parser().parse_args(argv))


def _generate(args) -> int:
    from tqdm import tqdm

    from rf_runtime.streamer import check_prompt
    from rf_runtime.video import Mp4Writer

    check_prompt(args.prompt)
    _check_seconds(args.seconds)
    writer = Mp4Writer(args.out)  # checks the path before the model is loaded
    try:
        t0 = time.perf_counter()
        streamer = _load_streamer(args)
        load_s = time.perf_counter() - t0
        num_frames = max(1, round(args.seconds * streamer.fps))
        writer.fps = streamer.fps
        bar = tqdm(total=num_frames, unit="frame", disable=args.quiet, file=sys.stderr)
        start = time.perf_counter()
        try:
            for chunk in streamer.stream_chunks(args.prompt, seed=args.seed, num_frames=num_frames):
                try:
                    writer.write(chunk.frames)
                except OutputError as exc:  # the encoder died: keep what it finished, say so in one line
                    bar.close()
                    kept = writer.salvage()
                    raise OutputError(
                        f"{exc}; "
                        + (
                            f"kept the {kept} frames it had encoded in {args.out}"
                            if kept
                            else f"nothing was written to {args.out}"
                        )
                    ) from None
                bar.update(len(chunk.frames))
                bar.set_postfix(
                    chunk=chunk.index,
                    latency=f"{chunk.seconds:.2f}s",
                    fps=f"{len(chunk.frames) / chunk.seconds:.2f}",
                )
        except KeyboardInterrupt:
            bar.close()
            if writer.frames_written:
                writer.close()
                print(
                    f"interrupted: saved the {writer.frames_written} frames made so far to {args.out}",
                    file=sys.stderr,
                )
                return 130
            writer.abort()
            return 130
        bar.close()
        elapsed = time.perf_counter() - start
        writer.close()
    except BaseException:
        writer.abort()
        raise
    h, w = streamer.info.frame_hw
    print(
        f"wrote {args.out}: {writer.frames_written} frames {w}x{h} at {streamer.fps} fps "
        f"({writer.frames_written / streamer.fps:.2f} s of video) in {elapsed:.1f} s "
        f"= {writer.frames_written / elapsed:.2f} generated fps (model load {load_s:.1f} s)"
    )
    return 0


MAX_SECONDS = (
    7 * 24 * 3600.0
)  # a week of video: beyond any stream a model was tested on, and still a finite int


def _check_seconds(seconds: float) -> None:
    if not (0 < seconds <= MAX_SECONDS):
        raise RFError(f"--seconds must be a number > 0 and at most {MAX_SECONDS:.0f} (a week), got {seconds}")


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rf-bench",
        description="Benchmark streaming: time to first frame, per-chunk latency, fps (denoise-only and end to end), "
        "warm-up, peak memory, and whether the per-chunk cost stays flat. With both --bundle and "
        "--model-dir, the onnxruntime engine and the PyTorch reference run on the same model, each in "
        "its own process. The JSON report says exactly what every number counts.",
    )
    add_version(p)
    p.add_argument("--bundle", help="engine bundle directory (rf-export onnx): runs onnxruntime")
    p.add_argument("--model-dir", help="model directory: runs the PyTorch reference loop")
    p.add_argument("--checkpoint", help="generator checkpoint on top of --model-dir")
    p.add_argument(
        "--chunks",
        type=int,
        default=200,
        help="chunks to stream per backend (default 200; 203 puts "
        "the late flat-cost window at chunks 198-202)",
    )
    p.add_argument("--prompt", default="a red fox running through fresh snow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="torch precision (the bundle's precision is fixed at export)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads of the torch run (default: torch's own); "
        "one thread is steadier on a machine shared with other work",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="torch run: the fast path (buffers allocated once per "
        "stream, CUDA graphs on a GPU; rf_runtime.backends.pytorch_static)",
    )
    p.add_argument(
        "--cuda-graphs",
        choices=("on", "off"),
        help="torch --static run: capture and replay CUDA graphs (default: on for --device cuda)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch --static run: torch.compile the DiT and VAE steps"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="onnxruntime intra-op threads of every session of the engine run "
        "(default: chosen from the machine; 1 with several --sessions)",
    )
    p.add_argument(
        "--spinning", action="store_true", help="let idle onnxruntime threads spin (default: they sleep)"
    )
    p.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="engine run: decode chunk n in a second thread while chunk n+1 denoises (same frames); auto "
        "(default): on for onnxruntime CPU with >= 2 usable cores and no --threads; --profile and "
        "--sessions run without it",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="per graph: calls and ms per chunk, FLOPs, achieved GFLOP/s "
        "against this machine's measured GEMM peak, host share",
    )
    p.add_argument(
        "--sessions",
        type=_counts,
        default=(),
        help="comma-separated numbers of streams to run at once, "
        "e.g. 1,2,4: aggregate and per-session fps and p99 chunk latency",
    )
    p.add_argument(
        "--json", help="report path (default rf-bench.json, rf-soak.json with --soak; written atomically)"
    )
    p.add_argument(
        "--estimate",
        metavar="BUNDLE",
        help="estimate instead: the memory a stream of BUNDLE needs per backend and precision (from its "
        "manifest, nothing loaded, no torch) against the free memory of --device; with --sessions N, N "
        "streams; exit 1 when it does not fit",
    )
    p.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="--estimate: the device's free memory in GiB (default: read from psutil or /proc/meminfo for "
        "cpu, cuda-python's cudaMemGetInfo for cuda)",
    )
    p.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="soak test instead: stream --bundle (default: the shipped bundle) without end for MINUTES and "
        "report RSS start / end and slope, chunk time early / late, non-finite and constant chunks",
    )
    return p


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return counts


def bench_main(argv: list[str] | None = None) -> int:
    return run_command("rf-bench", _bench, _bench_parser().parse_args(argv))


def _bench(args) -> int:
    from rf_runtime.bench import BenchRun, format_table, run_bench, write_json
    from rf_runtime.files import output_folder

    if args.soak is not None:
        return _soak(args)
    if args.estimate is not None:
        return _estimate(args)
    if args.device_memory is not None:
        raise RFError("--device-memory applies to --estimate: add --estimate BUNDLE")
    args.json = args.json or "rf-bench.json"

    runs = []
    if args.bundle:
        runs.append(
            BenchRun(
                "engine",
                args.bundle,
                device=args.device,
                cpu_threads=args.threads,
                spinning=args.spinning,
                overlap={"auto": None, "on": True, "off": False}[args.overlap],
            )
        )
    elif args.threads is not None or args.spinning or args.overlap != "auto":
        raise RFError("--threads, --spinning and --overlap apply to the engine run: add --bundle")
    if args.model_dir:
        runs.append(
            BenchRun(
                "torch",
                args.model_dir,
                args.checkpoint,
                device=args.device,
                dtype=args.dtype,
                threads=args.torch_threads,
                static=args.static,
                compile=args.compile,
                cuda_graphs=None if args.cuda_graphs is None else args.cuda_graphs == "on",
            )
        )
    elif args.static or args.cuda_graphs or args.compile:
        raise RFError("--static, --cuda-graphs and --compile apply to the torch run: add --model-dir")
    output_folder(args.json, "the report")  # before the benchmark, not after it
    if args.torch_threads is not None and not args.model_dir:
        raise RFError("--torch-threads applies to the torch run: add --model-dir, or drop --torch-threads")
    report = run_bench(
        runs,
        chunks=args.chunks,
        prompt=args.prompt,
        seed=args.seed,
        profile=args.profile,
        sessions=args.sessions,
        progress=lambda msg: print(f"rf-bench: {msg}", file=sys.stderr),
    )
    write_json(report, args.json)
    print(format_table(report))
    print(f"report: {args.json}")
    return 0


def _estimate(args) -> int:
    """rf-bench --estimate: torch-free (rf_runtime.memory reads the manifest only)."""
    from rf_runtime import memory

    if len(args.sessions) > 1:
        raise RFError("--estimate takes one --sessions count (the streams to hold at once)")
    streams = args.sessions[0] if args.sessions else 1
    bundle = memory.read_bundle(args.estimate)
    rows = memory.estimates(bundle, "cuda" if args.device.startswith("cuda") else "cpu", streams)
    if args.device_memory is not None:
        if args.device_memory <= 0:
            raise RFError(f"--device-memory {args.device_memory}: give the free memory in GiB, above 0")
        free, source = int(args.device_memory * memory.GIB), "--device-memory"
    else:
        free, source = memory.device_memory(args.device)
    print(memory.format_estimates(rows, free, source))
    for row in rows:
        if memory.verdict(row, free) != "fits":
            print(
                f"rf-bench: warning: {row.backend} {row.precision}: {memory.size(row.total)} needed, "
                f"{memory.size(free)} free on {args.device}"
                + (" (over 90%: other allocations may not fit)" if row.total <= free else ""),
                file=sys.stderr,
            )
    problem = memory.check(rows, free, args.estimate)
    if problem:
        print(f"rf-bench: error: {problem}", file=sys.stderr)
        return 1
    return 0


def _soak(args) -> int:
    from rf_runtime.bench import write_json
    from rf_runtime.bundle import default_engine_dir
    from rf_runtime.files import output_folder
    from rf_runtime.soak import format_soak, soak

    if args.model_dir or args.checkpoint or args.torch_threads is not None:
        raise RFError(
            "--soak streams an engine bundle: drop --model-dir / --checkpoint / --torch-threads, "
            "and pass --bundle BUNDLE (default: the shipped bundle)"
        )
    path = args.json or "rf-soak.json"
    output_folder(path, "the report")
    report = soak(
        args.bundle or default_engine_dir(),
        args.soak,
        prompt=args.prompt,
        seed=args.seed,
        progress=lambda msg: print(f"rf-bench: {msg}", file=sys.stderr, flush=True),
    )
    write_json(report, path)
    print(format_soak(report))
    print(f"report: {path}")
    return 0


# --------------------------------------------------------------------------------------------
# rf-eval
# --------------------------------------------------------------------------------------------


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rf-eval",
        description="Long-stream metrics of a video: dynamic degree, drift, subject consistency and, for prompts of "
        "the procedural world, prompt adherence. Give an MP4, or no video to generate a stream first.",
    )
    add_version(p)
    p.add_argument(
        "video",
        nargs="?",
        help="MP4 to evaluate; without it a stream of --seconds is generated and evaluated",
    )
    p.add_argument("--prompt", help="the prompt of the video (needed for prompt adherence, and to generate)")
    p.add_argument(
        "--prompts-file",
        help="generate and evaluate one stream per line of this file (e.g. "
        "configs/world_heldout_prompts.txt) and summarise the prompt-following checks",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="length of the generated stream (default 60)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generated stream (default 0)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the MP4 (default 16)")
    p.add_argument(
        "--segment-seconds", type=float, default=5.0, help="segment length for drift and dynamics (5)"
    )
    p.add_argument("--json", help="also write the metrics to this JSON file")
    _add_model_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    return run_command("rf-eval", _eval, _eval_parser().parse_args(argv))


def _eval(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from rf_runtime.world.adherence import (
        evaluate,
    )  # the metrics, with the procedural world's prompt adherence

    from rf_runtime.files import atomic_write, output_folder

    if args.json:
        output_folder(args.json, "the metrics")  # before the work, not after it
    if args.prompts_file:
        return _eval_prompts_file(args)
    if args.video:
        from rf_runtime.video import read_mp4

        frames, fps, what = read_mp4(args.video), args.fps, args.video
    else:
        if not args.prompt:
            raise RFError("give a video to evaluate, or --prompt to generate a stream and evaluate it")
        _check_seconds(args.seconds)
        streamer = _load_streamer(args)
        fps = streamer.fps
        num_frames = max(2, round(args.seconds * fps))
        bar = tqdm(total=num_frames, unit="frame", disable=args.quiet, file=sys.stderr)
        parts = []
        for frames in streamer.stream(args.prompt, seed=args.seed, num_frames=num_frames):
            parts.append(frames)
            bar.update(len(frames))
        bar.close()
        frames, what = (
            np.concatenate(parts),
            f"a {args.seconds:g} s stream of {args.prompt!r} (seed {args.seed})",
        )
    result = evaluate(frames, args.prompt, fps=fps, segment_seconds=args.segment_seconds)
    print(f"rf-eval: {what}")
    print(result.table())
    if args.json:
        atomic_write(args.json, lambda f: f.write(result.to_json().encode()), what="the metrics")
        print(f"wrote {args.json}")
    return 0


def _eval_prompts_file(args) -> int:
    import json
    import os

    import numpy as np

    from rf_runtime.world.adherence import evaluate
    from rf_runtime.world.follow import summarize, summary_table
    from rf_runtime.world.heldout import read_prompts_file

    if args.video or args.prompt:
        raise RFError("--prompts-file generates its own streams: leave out the video and --prompt")
    prompts = read_prompts_file(args.prompts_file)
    streamer = _load_streamer(args)
    num_frames = max(2, round(args.seconds * streamer.fps))
    results, following = {}, {}
    for prompt in prompts:
        frames = np.concatenate(list(streamer.stream(prompt, seed=args.seed, num_frames=num_frames)))
        result = evaluate(frames, prompt, fps=streamer.fps, segment_seconds=args.segment_seconds)
        results[prompt] = json.loads(result.to_json())
        checks = result.prompt_following.get("follow")
        if checks is None:
            raise RFError(f"{prompt!r} in {args.prompts_file} is not a prompt of the procedural world")
        following[prompt] = checks
        print(
            f"{prompt:<64} colour {checks['colour']:.2f} (last fifth {checks['colour_last_fifth']:.2f}) background "
            f"{checks['background']:.2f} shape {checks['shape']:.2f} one object {checks['one_object']:.2f} "
            f"motion {'ok' if checks['motion_ok'] else 'no'}"
        )
    summary = summarize(following)
    print(f"rf-eval: {len(prompts)} streams of {args.seconds:g} s (seed {args.seed})")
    print(summary_table(summary))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"summary": summary, "seconds": args.seconds, "seed": args.seed, "streams": results},
                f,
                indent=2,
            )
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
