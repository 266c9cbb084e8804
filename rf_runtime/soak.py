"""``rf-bench --soak MINUTES``: stream one bundle without end for a while and report what drifts.

One unbounded stream of the bundle runs for ``minutes``; after every chunk the process's resident
memory is read (``/proc/self/statm``) and the chunk's frames are checked. The report:

- chunks and frames made, wall time;
- RSS at the start (after the first chunk) and at the end, and its slope in MiB per hour by least
  squares over every chunk after the first minute (or the second half of a shorter run), so a leak
  of a few bytes per chunk shows as a steady positive slope, a one-off allocation does not;
- per-chunk wall time early (chunks 10 .. 10+W) against late (the last W chunks), W = max(20, n / 20):
  medians and their ratio (about 1 when the cost does not grow with the stream);
- the numeric guard's median time as a fraction of the median chunk;
- every chunk whose latents were not finite (the guard's ``StreamError``; the stream is then
  reopened with the next seed, so the soak goes on) and every constant chunk (all pixels equal).

numpy and the engine only: no torch.
"""

from __future__ import annotations

import os
import resource
import time

import numpy as np

from rf_runtime.errors import InputError, StreamError

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak, ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slope_per_hour(t_s: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against ``t_s`` (seconds), per hour; NaN with < 2 points."""
    if len(t_s) < 2 or np.ptp(t_s) == 0:
        return float("nan")
    return float(np.polyfit(t_s, values, 1)[0] * 3600.0)


def soak(
    bundle: str,
    minutes: float,
    *,
    prompt: str = "a red fox running through fresh snow",
    seed: int = 0,
    progress=None,
    clock=time.perf_counter,
) -> dict:
    """Stream ``bundle`` for ``minutes`` and return the report (a dict; ``format_soak`` prints it)."""
    from rf_runtime.streamer import Streamer

    if not (isinstance(minutes, (int, float)) and 0 < minutes <= 7 * 24 * 60):
        raise InputError(f"--soak takes minutes, a number > 0 and at most a week (10080), got {minutes!r}")
    streamer = Streamer.from_engine(bundle)
    stream = streamer.open(prompt, seed=seed)
    start = clock()
    end = start + minutes * 60.0
    times, guards, at, rss = [], [], [], []
    frames = 0
    non_finite, constant = [], []
    next_report = start + 60.0
    index = 0  # chunks over every stream of the soak
    while clock() < end:
        try:
            chunk = next(stream)
        except StreamError as exc:
            non_finite.append({"chunk": index, "error": str(exc)})
            seed += 1
            stream = streamer.open(prompt, seed=seed)
            index += 1
            continue
        now = clock()
        times.append(chunk.seconds)
        guards.append(chunk.guard_seconds)
        at.append(now - start)
        rss.append(rss_mib())
        frames += len(chunk.frames)
        if chunk.frames.min() == chunk.frames.max():
            constant.append(index)
        index += 1
        if progress and now >= next_report:
            progress(
                f"soak {(now - start) / 60:.1f} min: {len(times)} chunks, RSS {rss[-1]:.1f} MiB, "
                f"last chunk {chunk.seconds * 1000:.1f} ms"
            )
            next_report += 60.0
    wall = clock() - start
    return summarize_soak(
        np.array(times),
        np.array(guards),
        np.array(at),
        np.array(rss),
        frames=frames,
        wall_s=wall,
        minutes=minutes,
        non_finite=non_finite,
        constant=constant,
        bundle=os.fspath(bundle),
        describe=streamer.backend.describe(),
    )


def summarize_soak(
    times,
    guards,
    at,
    rss,
    *,
    frames: int,
    wall_s: float,
    minutes: float,
    non_finite: list,
    constant: list,
    bundle: str,
    describe: dict,
) -> dict:
    n = len(times)
    w = max(20, n // 20)
    early = times[10 : 10 + w]
    late = times[n - w :] if n >= 10 + 2 * w else times[:0]  # the two windows never overlap
    fit_from = 60.0 if at.size and at[-1] > 120.0 else (at[-1] / 2 if at.size else 0.0)
    keep = at >= fit_from
    med = lambda a: float(np.median(a)) if len(a) else float("nan")  # noqa: E731
    return {
        "bundle": bundle,
        "backend": describe,
        "minutes_asked": minutes,
        "wall_s": wall_s,
        "chunks": n,
        "frames": frames,
        "rss_start_mib": float(rss[0]) if n else float("nan"),
        "rss_end_mib": float(rss[-1]) if n else float("nan"),
        "rss_max_mib": float(rss.max()) if n else float("nan"),
        "rss_slope_mib_per_hour": slope_per_hour(at[keep], rss[keep]),
        "rss_fit_from_s": fit_from,
        "chunk_window": w,
        "early_chunks": [10, 10 + len(early) - 1],
        "late_chunks": [n - len(late), n - 1],
        "chunk_s_early_median": med(early),
        "chunk_s_late_median": med(late),
        "late_over_early": med(late) / med(early) if len(early) and len(late) else float("nan"),
        "chunk_s_median": med(times),
        "guard_s_median": med(guards),
        "guard_fraction_of_chunk": med(guards) / med(times) if n else float("nan"),
        "non_finite_chunks": non_finite,
        "constant_chunks": constant,
    }


def format_soak(r: dict) -> str:
    lines = [
        f"soak of {r['bundle']} ({r['backend'].get('backend')}, {r['backend'].get('device', '?')}): "
        f"{r['wall_s'] / 60:.1f} min, {r['chunks']} chunks, {r['frames']} frames",
        f"RSS start / end / max MiB     {r['rss_start_mib']:.1f} / {r['rss_end_mib']:.1f} / {r['rss_max_mib']:.1f}",
        f"RSS slope MiB per hour        {r['rss_slope_mib_per_hour']:+.3f} (least squares from {r['rss_fit_from_s']:.0f} s)",
        f"chunk ms early / late median  {r['chunk_s_early_median'] * 1000:.2f} / {r['chunk_s_late_median'] * 1000:.2f} "
        f"(chunks {r['early_chunks'][0]}-{r['early_chunks'][1]} / {r['late_chunks'][0]}-{r['late_chunks'][1]}), "
        f"late / early {r['late_over_early']:.3f}",
        f"numeric guard median          {r['guard_s_median'] * 1e6:.1f} us = {r['guard_fraction_of_chunk'] * 100:.3f} % "
        f"of the median chunk ({r['chunk_s_median'] * 1000:.2f} ms)",
        f"non-finite chunks             {len(r['non_finite_chunks'])}"
        + (f" at {[c['chunk'] for c in r['non_finite_chunks']][:20]}" if r["non_finite_chunks"] else ""),
        f"constant chunks               {len(r['constant_chunks'])}"
        + (f" at {r['constant_chunks'][:20]}" if r["constant_chunks"] else ""),
    ]
    return "\n".join(lines)
