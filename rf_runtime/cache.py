"""The fixed-size self-attention KV cache: attention sink + sliding window + EMA-Sink (SPEC section 3).

Backend-neutral: the bookkeeping is plain Python, and the tensor update uses only slicing,
slice assignment and arithmetic, so the same code runs on torch tensors and numpy arrays.

Layout. Per layer the cache keeps ``context_frames = sink_frames + window_frames - chunk_frames``
latent frames of keys and values (taken after the q/k RMSNorm, before RoPE), in *cache order*:

    [ sink (sink_frames) | window slot 0 (oldest chunk) | window slot 1 | ... ]

The chunk being generated is the newest window entry; it is not stored here while it is being
denoised, the model appends its own fresh keys after the context. Valid frames are always a
prefix of that order, so a key's RoPE position is simply its frame index in the buffer, and the
chunk's queries take the positions right after the valid context: chunk 0 at 0..2, chunk 1 at
3..5, chunk 2 and every later chunk at 6..8 (with the default 3 + 6 frames). Positions never
grow with the stream.

Commit (after a chunk's clean-context pass, once per chunk): the chunk's clean keys/values enter
the cache. The first chunk becomes the sink. Later chunks fill the window slots; when they are
full, the oldest window chunk is evicted and folded into the sink, token-aligned and elementwise:

    S_K <- alpha * S_K + (1 - alpha) * K_evicted      (the same for V)

The release code does this eviction lazily, on the first denoising step of the next chunk and
before its attention; doing it at commit time gives the same keys to every attention call, and
keeps the per-step graph free of state changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rf_runtime.errors import ConfigError
from rf_runtime.schema import as_int


@dataclass(frozen=True)
class CacheSpec:
    """Sizes of the cache in latent frames, and the EMA-Sink rate.

    chunk_frames: latent frames generated per chunk (3).
    sink_frames: frames of the attention sink (3, the first chunk); 0 for a pure sliding window.
    window_frames: frames of the sliding window, the current chunk included (6).
    ema_alpha: EMA-Sink rate in [0, 1]; 1 keeps the sink static (LongLive), 0.999 is the release.
    """

    chunk_frames: int = 3
    sink_frames: int = 3
    window_frames: int = 6
    ema_alpha: float = 0.999

    def __post_init__(self):
        c, s, w = (
            as_int(getattr(self, k), k, error=ConfigError)
            for k in ("chunk_frames", "sink_frames", "window_frames")
        )
        if c < 1:
            raise ConfigError(f"chunk_frames must be >= 1, got {c}")
        if s not in (0, c):
            raise ConfigError(
                f"sink_frames must be 0 (no sink) or equal to chunk_frames ({c}), got {s}: the sink is "
                "the first chunk, and evicted chunks are folded onto it frame by frame"
            )
        if w < c or w % c:
            raise ConfigError(
                f"window_frames ({w}) must be a positive multiple of chunk_frames ({c}): "
                "the window holds whole chunks, the current one included"
            )
        if not isinstance(self.ema_alpha, (int, float)) or not 0.0 <= float(self.ema_alpha) <= 1.0:
            raise ConfigError(f"ema_alpha must be a number in [0, 1], got {self.ema_alpha!r}")

    @property
    def context_frames(self) -> int:
        """Frames stored per layer: sink + window without the current chunk."""
        return self.sink_frames + self.window_frames - self.chunk_frames

    @property
    def window_slots(self) -> int:
        """Earlier chunks the window keeps besides the current one."""
        return (self.window_frames - self.chunk_frames) // self.chunk_frames

    @property
    def attention_frames(self) -> int:
        """Frames a chunk attends to once the cache is full (9 by default)."""
        return self.sink_frames + self.window_frames

    def valid_frames(self, chunks_committed: int) -> int:
        """Valid context frames after ``chunks_committed`` chunks have entered the cache."""
        if chunks_committed <= 0:
            return 0
        in_window = chunks_committed - 1 if self.sink_frames else chunks_committed
        return self.sink_frames + min(in_window, self.window_slots) * self.chunk_frames

    def query_positions(self, chunks_committed: int) -> range:
        """RoPE frame positions of the next chunk's queries (and its own keys)."""
        start = self.valid_frames(chunks_committed)
        return range(start, start + self.chunk_frames)


@dataclass(frozen=True)
class CommitPlan:
    """What committing the next chunk does, in frames of the context buffer."""

    write_start: int  # first frame the new chunk is written to
    evict: bool  # the oldest window chunk leaves (window full)
    fold: bool  # ... and is folded into the sink by EMA


def plan_commit(spec: CacheSpec, chunks_committed: int) -> CommitPlan:
    c, s = spec.chunk_frames, spec.sink_frames
    if s and chunks_committed == 0:
        return CommitPlan(write_start=0, evict=False, fold=False)  # the first chunk becomes the sink
    used = chunks_committed - 1 if s else chunks_committed
    if used < spec.window_slots:
        return CommitPlan(write_start=s + used * c, evict=False, fold=False)
    return CommitPlan(write_start=s + (spec.window_slots - 1) * c, evict=True, fold=bool(s))


def commit_chunk(spec: CacheSpec, chunks_committed: int, context, new, tokens_per_frame: int, axis: int = 2):
    """Write one chunk's clean keys (or values) into ``context`` in place, evicting and folding.

    context: [..., context_frames * T, ...] with the token axis at ``axis`` (torch or numpy).
    new: the chunk's keys/values, [..., chunk_frames * T, ...].
    Returns the same ``context`` object.
    """
    plan = plan_commit(spec, chunks_committed)
    t, c, s = tokens_per_frame, spec.chunk_frames, spec.sink_frames
    lead = (slice(None),) * axis

    def frames(a, b):
        return lead + (slice(a * t, b * t),)

    if plan.evict:
        if spec.window_slots == 0:
            evicted = new  # the window holds only the current chunk: it leaves at once
        else:
            evicted = context[frames(s, s + c)]
        if plan.fold:
            alpha = float(spec.ema_alpha)
            context[frames(0, s)] = alpha * context[frames(0, s)] + (1 - alpha) * evicted
        # Shift the remaining window chunks one slot towards the sink, oldest first, so every
        # copy reads a slot that has not been written yet.
        for slot in range(spec.window_slots - 1):
            dst = s + slot * c
            context[frames(dst, dst + c)] = context[frames(dst + c, dst + 2 * c)]
        if spec.window_slots == 0:
            return context
    context[frames(plan.write_start, plan.write_start + c)] = new
    return context


def commit_matrix(spec: CacheSpec, chunks_committed: int):
    """The commit as a frame-mixing matrix, for graphs with static shapes (numpy float64 [M, M + c]).

    new_context[i] = sum_j mix[i, j] * concat(context, new_chunk)[j], frame by frame (M context
    frames, c chunk frames). It has at most two non-zeros per row (alpha and 1 - alpha for the
    sink fold), so applying it gives the same numbers as ``commit_chunk``.
    """
    import numpy as np

    m, c = spec.context_frames, spec.chunk_frames
    ident = np.eye(m + c)
    # run the in-place commit on one-hot "frames" to read off which sources land where
    ctx = ident[:, :m].T.reshape(m, m + c).copy()  # ctx[i] = e_i
    new = ident[:, m:].T.reshape(c, m + c).copy()  # new[j] = e_{m+j}
    commit_chunk(spec, chunks_committed, ctx, new, tokens_per_frame=1, axis=0)
    return ctx
