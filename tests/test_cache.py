"""The sink + window cache and the EMA-Sink fold, worked by hand on small buffers."""

import numpy as np
import pytest
import torch

from rf_runtime.cache import CacheSpec, commit_chunk, plan_commit
from rf_runtime.errors import ConfigError

T = 2  # tokens per frame in these hand-worked examples


def chunk(value, frames=3):
    """A chunk of keys whose every entry of frame j equals value + j / 10 (shape [1, frames*T, 1])."""
    per_frame = np.repeat(value + np.arange(frames) / 10, T)
    return per_frame.reshape(1, frames * T, 1).astype(np.float64)


def frame_values(ctx):
    """The value held by each frame of a [1, M*T, 1] buffer (all tokens of a frame are equal)."""
    return [round(float(v), 6) for v in ctx[0, ::T, 0]]


def run(spec, values, lib=np):
    ctx = lib.zeros((1, spec.context_frames * T, 1), dtype=lib.float64)
    for n, v in enumerate(values):
        new = chunk(v) if lib is np else torch.from_numpy(chunk(v))
        commit_chunk(spec, n, ctx, new, T, axis=1)
    return ctx


def test_eviction_order_and_hand_worked_fold():
    spec = CacheSpec(chunk_frames=3, sink_frames=3, window_frames=6, ema_alpha=0.5)
    # chunk 0 -> sink; chunk 1 -> window; chunk 2 evicts chunk 1 (folded), chunk 3 evicts chunk 2
    ctx = run(spec, [0.0])
    assert frame_values(ctx) == [0.0, 0.1, 0.2, 0, 0, 0]
    ctx = run(spec, [0.0, 1.0])
    assert frame_values(ctx) == [0.0, 0.1, 0.2, 1.0, 1.1, 1.2]
    ctx = run(spec, [0.0, 1.0, 2.0])
    # sink frame j <- 0.5 * sink_j + 0.5 * chunk1_j, token-aligned; window = chunk 2
    assert frame_values(ctx) == [0.5, 0.6, 0.7, 2.0, 2.1, 2.2]
    ctx = run(spec, [0.0, 1.0, 2.0, 3.0])
    # sink <- 0.5 * (0.5, 0.6, 0.7) + 0.5 * (2.0, 2.1, 2.2)
    assert frame_values(ctx) == [1.25, 1.35, 1.45, 3.0, 3.1, 3.2]


def test_fold_formula_alpha_0999_with_torch():
    spec = CacheSpec(ema_alpha=0.999)
    ctx = run(spec, [0.0, 1.0, 2.0, 3.0], lib=torch)
    s1 = 0.999 * 0.0 + 0.001 * 1.0
    s2 = 0.999 * s1 + 0.001 * 2.0
    assert frame_values(ctx)[0] == round(s2, 6)
    assert frame_values(ctx)[3:] == [3.0, 3.1, 3.2]


def test_static_sink_when_alpha_is_one():
    spec = CacheSpec(ema_alpha=1.0)
    ctx = run(spec, [7.0, 1.0, 2.0, 3.0, 4.0])
    assert frame_values(ctx) == [7.0, 7.1, 7.2, 4.0, 4.1, 4.2]


def test_pure_window_without_sink():
    spec = CacheSpec(chunk_frames=3, sink_frames=0, window_frames=9, ema_alpha=0.5)
    ctx = run(spec, [0.0, 1.0, 2.0, 3.0])
    # two earlier chunks are kept, oldest first; nothing is folded anywhere
    assert frame_values(ctx) == [2.0, 2.1, 2.2, 3.0, 3.1, 3.2]


def test_longer_window_shifts_oldest_first():
    spec = CacheSpec(chunk_frames=3, sink_frames=3, window_frames=12, ema_alpha=0.5)
    ctx = run(spec, [0.0, 1.0, 2.0, 3.0, 4.0])
    # window keeps chunks 2, 3, 4 (chunk 1 was evicted and folded at chunk 4's commit)
    assert frame_values(ctx) == [0.5, 0.6, 0.7, 2.0, 2.1, 2.2, 3.0, 3.1, 3.2, 4.0, 4.1, 4.2]


def test_relative_positions():
    spec = CacheSpec()
    assert [list(spec.query_positions(n)) for n in range(5)] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [6, 7, 8],
        [6, 7, 8],
    ]
    assert [spec.valid_frames(n) for n in range(4)] == [0, 3, 6, 6]
    assert spec.context_frames == 6 and spec.attention_frames == 9
    nosink = CacheSpec(sink_frames=0, window_frames=9)
    assert [list(nosink.query_positions(n))[0] for n in range(4)] == [0, 3, 6, 6]


def test_plan_commit_evicts_once_per_chunk_after_full():
    spec = CacheSpec()
    plans = [plan_commit(spec, n) for n in range(6)]
    assert [p.evict for p in plans] == [False, False, True, True, True, True]
    assert all(p.fold for p in plans[2:])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ema_alpha=1.5),
        dict(ema_alpha=-0.1),
        dict(ema_alpha="0.9"),
        dict(sink_frames=2),
        dict(window_frames=4),
        dict(chunk_frames=0),
    ],
)
def test_bad_cache_settings(kwargs):
    with pytest.raises(ConfigError) as err:
        CacheSpec(**kwargs)
    assert any(
        word in str(err.value) for word in ("ema_alpha", "sink_frames", "window_frames", "chunk_frames")
    )


@pytest.mark.parametrize(
    "spec",
    [
        CacheSpec(ema_alpha=0.37),
        CacheSpec(sink_frames=0, window_frames=9),
        CacheSpec(window_frames=12, ema_alpha=0.5),
        CacheSpec(window_frames=3, ema_alpha=0.8),
    ],
)
def test_commit_matrix_equals_in_place_commit(spec):
    from rf_runtime.cache import commit_matrix

    rng = np.random.default_rng(0)
    ctx_a = np.zeros((1, spec.context_frames * T, 1))
    ctx_b = ctx_a.copy()
    for n in range(6):
        new = rng.standard_normal((1, spec.chunk_frames * T, 1))
        commit_chunk(spec, n, ctx_a, new, T, axis=1)
        mix = commit_matrix(spec, n)
        frames = np.concatenate([ctx_b, new], axis=1).reshape(spec.context_frames + spec.chunk_frames, T)
        ctx_b = (mix @ frames).reshape(1, -1, 1)
        assert np.allclose(ctx_a, ctx_b, rtol=0, atol=1e-12), n
