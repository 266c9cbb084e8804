"""Batching across streams: one chunk of several streams through one call of each graph.

    from rf_runtime.batching import next_chunks

    streams = [streamer.open(p, seed=s) for p, s in requests]
    while streams:
        for stream, chunk in zip(streams, next_chunks(streams)):
            ...  # a Chunk, or the StreamError of that stream alone
        streams = [s for s in streams if not s.finished]

At a chunk boundary ``next_chunks`` splits the streams into groups that the backend runs in one call
each (``Backend.batch_sizes``: a bundle exported with ``rf-export onnx --batch-sizes 1,2,4``): groups
of the largest size, and the rest in one group padded up to the smallest size that holds it (3 streams
on sizes 1, 2, 4 run as one call of 4 rows, one of them padding). A group gathers its streams' state
(``Backend.gather``), runs every denoising step, the cache pass and the decode of all rows together, and
hands each stream back its own state; a stream of one runs the one-stream path. The rows of a call
never mix (every operation of the graphs is per row), so each stream's frames are what it makes
alone: same seed, same prompt, prompt switches included (``Stream.set_prompt`` acts between chunks
on the one stream). Streams may join and leave between calls: a call takes whatever list it is given.

Torch-free; the streamer layer's one place for batching.
"""

from __future__ import annotations

import time

from rf_runtime.errors import InputError, RFError
from rf_runtime.streamer import Chunk, Stream


def plan_groups(n: int, sizes: tuple[int, ...]) -> list[int]:
    """How many rows each call of a batched chunk takes for ``n`` streams on a backend serving ``sizes``
    rows per call: as many full calls of the largest size as fit, then the rest in one call (padded by
    the backend to the smallest size >= the rest). ``plan_groups(7, (1, 2, 4)) == [4, 3]``."""
    if n < 0:
        raise InputError(f"the number of streams must be >= 0, got {n}")
    largest = max(sizes)
    groups = [largest] * (n // largest)
    if n % largest:
        groups.append(n % largest)
    return groups


def next_chunks(streams: list[Stream]) -> list[Chunk | RFError]:
    """The next chunk of every stream in ``streams`` (all open, none finished, of one ``Streamer``'s
    backend), made together. Returns one entry per stream, in order: its ``Chunk``, or the
    ``RFError`` that stopped that stream alone (e.g. non-finite latents: the stream is then closed,
    the others go on). A chunk's ``seconds`` is the wall time of its group's call."""
    if not streams:
        return []
    backend = streams[0]._backend
    if len({id(s) for s in streams}) != len(streams):
        raise InputError("next_chunks got the same stream twice: pass each stream once")
    for s in streams:
        if not isinstance(s, Stream):
            raise InputError(f"next_chunks takes Stream objects (Streamer.open), got {type(s).__name__}")
        if s._backend is not backend:
            raise InputError("next_chunks takes streams of one Streamer: they share its backend's graphs")
        if s.finished or s._state is None:
            raise InputError(
                f"stream {streams.index(s)} is {'finished' if s.finished else 'closed'}: "
                "pass only streams that have chunks left"
            )
    out: list[Chunk | RFError] = []
    start = 0
    for size in plan_groups(len(streams), backend.batch_sizes()):
        group = streams[start : start + size]
        start += size
        if size == 1:
            try:
                out.append(next(group[0]))
            except RFError as exc:
                out.append(exc)
        else:
            out.extend(_group_chunks(group))
    return out


def _group_chunks(streams: list[Stream]) -> list[Chunk | RFError]:
    """One chunk of each stream through one call per graph (``Backend.gather`` ... ``release``); the same
    steps, in the same order, as ``Stream._next_chunk`` runs for one stream."""
    be, settings = streams[0]._backend, streams[0].info.settings
    start = time.perf_counter()
    for s in streams:  # a chunk made ahead by the stream's own loop (overlap) is made here instead
        s._discard_ahead()
    noise = [s._draw_noise() for s in streams]
    rows = be.gather([s._state for s in streams])
    try:
        xs = [be.upload(init) for init, _ in noise]
        for k in range(settings.num_steps):
            last = k + 1 == settings.num_steps
            eps = [None if last else be.upload(fresh[k]) for _, fresh in noise]
            x0s, xs = be.denoise_rows(rows, xs, k, eps)
        guard = time.perf_counter()
        bad = [not be.all_finite(x0) for x0 in x0s]  # the numeric guard, per stream
        guard = time.perf_counter() - guard
        be.store_rows(rows, [s.chunk_index % s.info.context_chunks for s in streams], x0s)
        be.cache_pass_rows(rows, x0s)
        be.synchronize()
        denoised = time.perf_counter()
        frames = be.decode_rows(rows, x0s)
    finally:
        be.release(rows)
    end = time.perf_counter()
    out: list[Chunk | RFError] = []
    for s, f, broken in zip(streams, frames, bad):
        if broken:  # its state took the chunk's damaged latents: nothing of it can go on
            out.append(s._nonfinite())
            s.close()
        else:
            out.append(s._emit(f, end - start, denoised - start, end - denoised, guard))
    return out


__all__ = ["next_chunks", "plan_groups"]
