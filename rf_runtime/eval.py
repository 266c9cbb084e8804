"""Long-stream video metrics (numpy, plus OpenCV for optical flow): dynamic degree, drift, subject consistency, prompt adherence.

The metrics follow VBench's definitions where one exists, with light stand-ins for its neural parts
(no model downloads here); each function says what it computes and what it replaces.

- ``dynamic degree`` (VBench): per pair of frames at about 8 fps, the mean of the largest 5 % of
  optical-flow magnitudes; a segment is *dynamic* when more than ``round(4 * n / 16)`` of its pair
  scores exceed ``6 * min(H, W) / 256`` pixels. VBench's flow is RAFT; here it is OpenCV's
  Farneback flow (``optical_flow``; the ``eval`` extra), no network weights needed.
  Reported: the percentage of dynamic segments, and the mean flow score.
- ``drift``: how far the last segment has moved from the first in frame statistics (mean and std
  of each RGB channel, mean gradient magnitude), in 0..255 units; and, when the prompt is known,
  ``quality drift`` (from the prompt check): the change of palette quality between the first and last segment.
- ``subject consistency`` (VBench uses DINO features): cosine similarity of a subject descriptor
  (colour histogram of the foreground) of each frame with the first frame and the previous frame,
  averaged, in percent.
- ``travel`` (not in VBench): how far the subject goes: the spread (95th - 5th percentile) of the
  foreground centroid along its widest axis, in pixels, and its median speed in pixels per frame.
  Flow-based dynamic degree cannot tell a shape crossing the frame from one wobbling in place.
- ``prompt adherence``: only a world that knows what its prompts look like can score it; the
  procedural world's scorer (``rf_runtime.world.adherence``) is passed in as ``prompt_check``.
  This module knows nothing of any world.

Segments are ``segment_seconds`` long (5 s); streams of 60 s or more give 12 or more segments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from rf_runtime.errors import InputError, require

FLOW_FPS = 8  # VBench samples frames at about 8 fps for dynamic degree


def _check_video(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) < 2:
        raise InputError(f"a video needs at least 2 frames to evaluate, got {len(frames)}")
    return frames


# --------------------------------------------------------------------------------------------
# Optical flow and dynamic degree
# --------------------------------------------------------------------------------------------


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense optical flow from frame a to frame b (uint8 [H, W, 3]): float32 [H, W, 2] (dx, dy) in pixels.

    OpenCV's Farneback flow on the grey frames (pyramid 3 levels at scale 0.5, window 9), a
    classical stand-in for VBench's RAFT; on the procedural world's translations it is within
    about 5 % of the true displacement (``tests/test_eval.py``).
    """
    cv2 = require("cv2", "eval")
    ga, gb = (cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in (a, b))
    return cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 9, 3, 5, 1.1, 0)


def flow_score(flow: np.ndarray) -> float:
    """VBench's per-pair score: the mean of the largest 5 % of flow magnitudes."""
    mag = np.hypot(flow[..., 0], flow[..., 1]).ravel()
    k = max(1, int(mag.size * 0.05))
    return float(np.sort(mag)[-k:].mean())


def dynamic_scores(frames: np.ndarray, fps: int = 16) -> np.ndarray:
    """Flow scores of consecutive frames sampled at about 8 fps (VBench), float64 [pairs]."""
    step = max(1, round(fps / FLOW_FPS))
    sub = frames[::step]
    return np.array([flow_score(optical_flow(x, y)) for x, y in zip(sub[:-1], sub[1:])])


def is_dynamic(scores: np.ndarray, frame_hw: tuple[int, int]) -> bool:
    """VBench's decision: more than round(4 n / 16) scores above 6 * min(H, W) / 256 (the last 2 ignored)."""
    thres = 6.0 * min(frame_hw) / 256.0
    count_num = round(4 * (len(scores) + 1) / 16.0)
    return int((scores[:-2] > thres).sum()) > count_num


# --------------------------------------------------------------------------------------------
# Foreground, subject descriptor, palette
# --------------------------------------------------------------------------------------------


def background_colour(frame: np.ndarray) -> np.ndarray:
    """The median colour of the frame border (the procedural world's background), float [3]."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def foreground_mask(frame: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour is farther than ``threshold`` (RGB distance, 0..255) from the background."""
    d = np.linalg.norm(frame.astype(np.float32) - background_colour(frame), axis=-1)
    return d > threshold


def subject_descriptor(frame: np.ndarray, bins: int = 4) -> np.ndarray:
    """Colour histogram of the foreground (bins^3 RGB cells), L2-normalised; zeros if no foreground."""
    mask = foreground_mask(frame)
    q = (frame[mask].astype(np.int64) * bins) // 256
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    n = np.linalg.norm(hist)
    return hist / n if n else hist


def centroid_track(frames: np.ndarray) -> np.ndarray:
    """Foreground centroid (x, y) of each frame in pixels, float64 [T, 2]; NaN where there is no foreground."""
    out = np.full((len(frames), 2), np.nan)
    for i, f in enumerate(frames):
        ys, xs = np.nonzero(foreground_mask(f))
        if len(xs):
            out[i] = xs.mean() + 0.5, ys.mean() + 0.5
    return out


def travel(frames: np.ndarray) -> tuple[float, float]:
    """(spread, speed): 95th - 5th percentile of the centroid along its widest axis (px), and the
    median centroid step (px per frame); zeros when the subject is never seen."""
    track = centroid_track(frames)
    seen = track[~np.isnan(track[:, 0])]
    if len(seen) < 2:
        return 0.0, 0.0
    spread = float(np.max(np.percentile(seen, 95, axis=0) - np.percentile(seen, 5, axis=0)))
    steps = np.linalg.norm(np.diff(track, axis=0), axis=1)
    steps = steps[~np.isnan(steps)]
    return spread, float(np.median(steps)) if len(steps) else 0.0


def subject_consistency(frames: np.ndarray) -> float:
    """VBench's form over a stand-in descriptor: mean over frames t >= 1 of
    (cos(d_t, d_0) + cos(d_t, d_{t-1})) / 2, in percent."""
    d = np.stack([subject_descriptor(f) for f in frames])
    sims = [(d[t] @ d[0] + d[t] @ d[t - 1]) / 2 for t in range(1, len(d))]
    return 100.0 * float(np.mean(sims))


def frame_statistics(frames: np.ndarray) -> np.ndarray:
    """Per-frame [mean R, G, B, std R, G, B, mean gradient magnitude], 0..255 units: float64 [T, 7]."""
    x = frames.astype(np.float64)
    gray = x.mean(-1)
    grad = np.hypot(np.diff(gray, axis=1)[:, :, :-1], np.diff(gray, axis=2)[:, :-1, :]).mean(axis=(1, 2))
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), grad[:, None]], axis=1)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    seconds: float
    segments: int
    dynamic_degree: float  # percent of segments judged dynamic (VBench rule)
    flow_score: float  # mean VBench flow score over the stream, pixels
    drift: float  # mean |stats(last segment) - stats(first segment)|, 0..255 units
    subject_consistency: float  # percent
    travel: float = 0.0  # centroid spread along the widest axis, pixels
    centroid_speed: float = 0.0  # median centroid step, pixels per frame
    prompt_adherence: float | None = None  # percent; procedural prompts only
    colour_score: float | None = None
    shape_score: float | None = None
    quality_drift: float | None = None  # |palette quality(last) - palette quality(first)|, percent points
    per_segment: dict = field(default_factory=dict)
    prompt_following: dict = field(default_factory=dict)  # a world's prompt-following checks, by scorer name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        rows = [
            ("seconds", self.seconds),
            ("segments", self.segments),
            ("dynamic degree %", self.dynamic_degree),
            ("flow score (px)", self.flow_score),
            ("drift (stats)", self.drift),
            ("subject consistency %", self.subject_consistency),
            ("travel (px)", self.travel),
            ("centroid speed (px/fr)", self.centroid_speed),
        ]
        if self.prompt_adherence is not None:
            rows += [
                ("prompt adherence %", self.prompt_adherence),
                ("  colour score", self.colour_score),
                ("  shape score", self.shape_score),
                ("quality drift (pts)", self.quality_drift),
            ]
        for scorer, checks in self.prompt_following.items():
            rows += [
                (f"{scorer}: {k}", float(v) if isinstance(v, (bool, float)) else v)
                for k, v in checks.items()
                if isinstance(v, (bool, int, float))
            ]
        return "\n".join(
            f"{name:<24}{value:>10.3f}" if isinstance(value, float) else f"{name:<24}{value:>10}"
            for name, value in rows
        )


def evaluate(
    frames, prompt: str | None = None, *, fps: int = 16, segment_seconds: float = 5.0, prompt_check=None
) -> EvalResult:
    """All metrics of a video (uint8 [T, H, W, 3]).

    prompt_check: ``prompt_check(frames, segments, prompt) -> dict | None``, the scorer of a world
        that knows what its prompts look like (``rf_runtime.world.adherence.prompt_check`` for the
        procedural world); its dict fills ``prompt_adherence``, ``colour_score``, ``shape_score``,
        ``quality_drift`` and adds its ``per_segment`` entries. None, or a prompt it cannot judge:
        no adherence.
    """
    frames = _check_video(frames)
    seg = max(2, int(round(segment_seconds * fps)))
    segments = [frames[i : i + seg] for i in range(0, len(frames), seg)]
    if len(segments) > 1 and len(segments[-1]) < seg // 2:
        segments[-2] = np.concatenate([segments[-2], segments[-1]])
        segments.pop()
    scores = [dynamic_scores(s, fps) for s in segments]
    dynamic = [is_dynamic(s, frames.shape[1:3]) for s in scores]
    stats = [frame_statistics(s).mean(0) for s in segments]
    consistency = [subject_consistency(s) for s in segments]
    per_segment = {
        "dynamic": dynamic,
        "flow_score": [float(s.mean()) if len(s) else 0.0 for s in scores],
        "subject_consistency": consistency,
    }
    result = EvalResult(
        seconds=len(frames) / fps,
        segments=len(segments),
        dynamic_degree=100.0 * float(np.mean(dynamic)),
        flow_score=float(np.concatenate(scores).mean()) if sum(map(len, scores)) else 0.0,
        drift=float(np.abs(stats[-1] - stats[0]).mean()),
        subject_consistency=subject_consistency(frames),
        per_segment=per_segment,
    )
    result.travel, result.centroid_speed = travel(frames)
    found = prompt_check(frames, segments, prompt) if prompt and prompt_check is not None else None
    if found:
        per_segment.update(found.get("per_segment", {}))
        for name in ("prompt_adherence", "colour_score", "shape_score", "quality_drift"):
            setattr(result, name, found.get(name))
        result.prompt_following = found.get("prompt_following", {})
    return result
