"""Position tables in numpy (float64 math, float32 results), written once and shared by every backend
and the PyTorch models: the timestep sinusoid, the 3D RoPE tables, the chunk's mask + RoPE tables."""

from __future__ import annotations

import numpy as np


def timestep_sinusoid_np(t, freq_dim: int) -> np.ndarray:
    """Sinusoidal timestep embedding, cos then sin, base 10000, computed in float64."""
    arg = np.asarray(t, dtype=np.float64)[..., None] * sinusoid_frequencies(freq_dim)
    return np.concatenate([np.cos(arg), np.sin(arg)], axis=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex frequencies for (time, height, width): 22/21/21 at head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _angles(positions, n_freq: int, theta: float = 10000.0) -> np.ndarray:
    dim = 2 * n_freq
    inv = 1.0 / np.power(theta, np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.asarray(positions, dtype=np.float64)[:, None] * inv


def rope_tables_np(frame_positions, grid_hw: tuple[int, int], head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [F*h*w, head_dim] float32 for frames at ``frame_positions`` on an h x w grid,
    repeated per interleaved pair (x[2i], x[2i+1])."""
    fpos = np.asarray(list(frame_positions), dtype=np.float64).reshape(-1)
    h, w = grid_hw
    nt, nh, nw = rope_split(head_dim)
    f = fpos.size
    angles = np.concatenate(
        [
            np.broadcast_to(_angles(fpos, nt)[:, None, None, :], (f, h, w, nt)),
            np.broadcast_to(_angles(np.arange(h), nh)[None, :, None, :], (f, h, w, nh)),
            np.broadcast_to(_angles(np.arange(w), nw)[None, None, :, :], (f, h, w, nw)),
        ],
        axis=-1,
    ).reshape(f * h * w, head_dim // 2)
    cos = np.repeat(np.cos(angles), 2, axis=-1).astype(np.float32)
    sin = np.repeat(np.sin(angles), 2, axis=-1).astype(np.float32)
    return cos, sin


def chunk_tables(
    context_frames: int, chunk_frames: int, valid_frames: int, grid_hw: tuple[int, int], head_dim: int
) -> dict[str, np.ndarray]:
    """The position and validity tables of one chunk against a cache whose first ``valid_frames`` of
    ``context_frames`` frames are valid (SPEC section 3), float32, keyed by the ``dit_step`` input names:

    key_mask [(M + f) * T]: 1 for a valid context key and for every key of the chunk itself, else 0;
    cos_ctx, sin_ctx [M * T, D]: RoPE of the context slots (frame positions 0..M-1);
    cos_q, sin_q [f * T, D]: RoPE of the chunk's queries and keys (positions right after the valid context).
    """
    tpf = grid_hw[0] * grid_hw[1]
    mask = np.concatenate(
        [np.arange(context_frames * tpf) < valid_frames * tpf, np.ones(chunk_frames * tpf, bool)]
    )
    cos_ctx, sin_ctx = rope_tables_np(range(context_frames), grid_hw, head_dim)
    cos_q, sin_q = rope_tables_np(range(valid_frames, valid_frames + chunk_frames), grid_hw, head_dim)
    return {
        "key_mask": mask.astype(np.float32),
        "cos_ctx": cos_ctx,
        "sin_ctx": sin_ctx,
        "cos_q": cos_q,
        "sin_q": sin_q,
    }


def sinusoid_frequencies(freq_dim: int) -> np.ndarray:
    """The timestep sinusoid's frequencies 10000^(-i / half), i < half, float64 [freq_dim // 2]."""
    half = freq_dim // 2
    return np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
