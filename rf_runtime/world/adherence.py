"""Prompt adherence in the procedural world: its prompts name a colour and a shape, and the world
knows what they look like (``rf_runtime.world.procedural``). ``prompt_check`` is the scorer that
``rf_runtime.eval.evaluate`` takes; ``evaluate`` is that evaluation with it plugged in.

- colour score: share of foreground pixels whose nearest palette colour is the prompt's;
- shape score: share of frames whose foreground blob has the fill ratio (area / bounding box:
  circle pi/4, square 1, triangle 1/2) of the prompt's shape closest;
- prompt adherence: their mean, in percent;
- quality drift: the change, first to last segment, of the share of pixels near the two colours a
  frame of the prompt may hold (the shape's and the background's), in percent points.
"""

from __future__ import annotations

import math

import numpy as np

from rf_runtime import eval as _eval
from rf_runtime.eval import EvalResult, foreground_mask
from rf_runtime.world.procedural import BACKGROUNDS, COLOURS, FPS, parse_prompt


def palette_quality(frames: np.ndarray, colour_rgb, background_rgb, tol: float = 60.0) -> float:
    """Percent of pixels within ``tol`` of the two colours a procedural frame may hold."""
    x = frames.astype(np.float32)
    near = [
        np.linalg.norm(x - np.asarray(c, np.float32), axis=-1) < tol for c in (colour_rgb, background_rgb)
    ]
    return 100.0 * float((near[0] | near[1]).mean())


def colour_score(frames: np.ndarray, colour: str) -> float:
    """Share of foreground pixels (all frames) whose nearest palette colour is ``colour``, in [0, 1]."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float32)
    pixels = np.concatenate([f[foreground_mask(f)] for f in frames]).astype(np.float32)
    if not len(pixels):
        return 0.0
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return float((nearest == names.index(colour)).mean())


FILL_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def classify_shape(frame: np.ndarray) -> str | None:
    """The procedural shape whose fill ratio (area / bounding box) is nearest to the foreground's."""
    mask = foreground_mask(frame)
    if mask.sum() < 6:
        return None
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    return min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill))


def shape_score(frames: np.ndarray, shape: str) -> float:
    return float(np.mean([classify_shape(f) == shape for f in frames]))


def prompt_check(frames: np.ndarray, segments: list, prompt: str) -> dict | None:
    """Adherence of a video (and its segments) to a procedural prompt; None when the prompt names no
    procedural colour and shape."""
    said = parse_prompt(prompt)
    if not (said["colour"] and said["shape"]):
        return None
    colour, shape = colour_score(frames, said["colour"]), shape_score(frames, said["shape"])
    quality = [palette_quality(s, COLOURS[said["colour"]], BACKGROUNDS[said["background"]]) for s in segments]
    from rf_runtime.world.follow import eval_hook

    following = eval_hook(frames, prompt, FPS)  # issue 16's checks (None without a motion)
    return {
        "colour_score": colour,
        "shape_score": shape,
        "prompt_adherence": 100.0 * (colour + shape) / 2,
        "quality_drift": abs(quality[-1] - quality[0]),
        "per_segment": {"palette_quality": quality},
        "prompt_following": {"follow": following} if following else {},
    }


def evaluate(frames, prompt: str | None = None, **options) -> EvalResult:
    """``rf_runtime.eval.evaluate`` with the procedural world's prompt adherence."""
    return _eval.evaluate(frames, prompt, prompt_check=prompt_check, **options)
