"""A procedural text-to-video world: coloured shapes moving and bouncing on plain backgrounds.

It gives the project data it can generate itself (no downloads), with prompts that describe each
video and the ground truth behind them (shape, colour, size, motion, background, trajectory), so
models trained on it can be evaluated against what the prompt asked for.

    spec = sample_scene(seed=3)           # a Scene: attributes + prompt
    video = render(spec, num_frames=33)   # uint8 [T, H, W, 3], 16 fps
    spec.prompt                           # "a small blue square moving left on a gray background"

Everything is numpy and deterministic by seed. Shapes move in straight lines and bounce off the
frame edges (the centre stays at least ``radius`` from every edge), so the shape is always fully
inside the frame. Edges are anti-aliased by a one-pixel ramp of a signed distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import InputError
from rf_runtime.schema import as_int

FPS = 16

# RGB in 0..255
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "white": (245, 245, 245),
}
DEFAULT_BACKGROUND = "black"  # what a prompt that names no background gets
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "big": 0.2}  # radius as a fraction of the shorter frame side
SPEEDS = {"slow": 0.9, "fast": 2.2}  # pixels per frame at 64 px (scaled with the frame size)
MOTIONS = ("bouncing", "moving left", "moving right", "moving up", "moving down")
# every word a prompt of this world uses (``describe``); a model trained on it knows no other
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            "a",
            "on",
            "background",
            "slowly",
            "quickly",
            *SHAPES,
            *COLOURS,
            *BACKGROUNDS,
            *SIZES,
            *(w for m in MOTIONS for w in m.split()),
        }
    )
)
_DIRECTIONS = {
    "moving left": (-1.0, 0.0),
    "moving right": (1.0, 0.0),
    "moving up": (0.0, -1.0),
    "moving down": (0.0, 1.0),
}


@dataclass(frozen=True)
class Scene:
    """Ground truth of one procedural video. Positions are in pixels, (x, y), y downwards."""

    shape: str
    colour: str
    size: str
    speed: str
    motion: str
    background: str
    start: tuple[float, float]  # centre at frame 0
    velocity: tuple[float, float]  # pixels per frame
    height: int = 64
    width: int = 64
    prompt: str = ""

    @property
    def radius(self) -> float:
        return SIZES[self.size] * min(self.height, self.width)

    def trajectory(self, num_frames: int) -> np.ndarray:
        """Centre of the shape in each frame, float64 [num_frames, 2] (x, y), bouncing off the edges."""
        r = self.radius
        lo = np.array([r, r])
        span = np.array([self.width - 2 * r, self.height - 2 * r])
        t = np.arange(num_frames, dtype=np.float64)[:, None]
        raw = np.array(self.start) - lo + t * np.array(self.velocity)
        # reflect into [0, span]: a triangle wave of period 2 * span
        folded = np.mod(raw, 2 * span)
        return lo + np.where(folded > span, 2 * span - folded, folded)


def describe(
    shape: str, colour: str, size: str | None, speed: str | None, motion: str, background: str | None
) -> str:
    """The prompt of a scene; optional words (size, speed, background) are left out when None."""
    words = ["a"]
    if size:
        words.append(size)
    words += [colour, shape]
    words.append(motion)
    if speed:
        words.append("slowly" if speed == "slow" else "quickly")
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def sample_scene(seed: int, height: int = 64, width: int = 64) -> Scene:
    """A random scene and its prompt, fully determined by ``seed``.

    The prompt always names the shape, the colour and the motion; size, speed and background are
    named about half of the time (unnamed: a random size and speed, the black background).
    """
    if height < 16 or width < 16:
        raise InputError(f"frames must be at least 16x16, got {height}x{width}")
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = SHAPES[rng.integers(len(SHAPES))]
    say_background = rng.random() < 0.5
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))] if say_background else DEFAULT_BACKGROUND
    colours = [
        c for c in COLOURS if COLOURS[c] != BACKGROUNDS[background]
    ]  # never a shape the colour of its background
    colour = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    motion = MOTIONS[rng.integers(len(MOTIONS))]
    say_size, say_speed = rng.random() < 0.5, rng.random() < 0.5
    radius = SIZES[size] * min(height, width)
    start = (float(rng.uniform(radius, width - radius)), float(rng.uniform(radius, height - radius)))
    pixels_per_frame = SPEEDS[speed] * min(height, width) / 64.0
    if motion == "bouncing":
        angle = rng.uniform(0.15, 0.35) * math.pi + rng.integers(4) * math.pi / 2  # diagonal-ish
        direction = (math.cos(angle), math.sin(angle))
    else:
        direction = _DIRECTIONS[motion]
    velocity = (direction[0] * pixels_per_frame, direction[1] * pixels_per_frame)
    prompt = describe(
        shape,
        colour,
        size if say_size else None,
        speed if say_speed else None,
        motion,
        background if say_background else None,
    )
    return Scene(shape, colour, size, speed, motion, background, start, velocity, height, width, prompt)


def shape_coverage(
    shape: str, centre: tuple[float, float], radius: float, height: int, width: int
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 [H, W], of a shape centred at ``centre`` (x, y)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        dist = np.hypot(dx, dy) - radius
    elif shape == "square":
        half = radius * 0.85  # a square of the same visual weight as the circle
        dist = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":
        # equilateral, pointing up, inscribed in the circle of ``radius``: max of 3 half-plane distances
        dist = np.full_like(dx, -np.inf)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3 + math.pi  # outward normals at 90+180, 210+180, 330+180 deg
            nx, ny = math.cos(a), -math.sin(a)
            dist = np.maximum(dist, dx * nx + dy * ny - radius / 2)
    else:
        raise InputError(f"unknown shape {shape!r}: use one of {SHAPES}")
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def render(scene: Scene, num_frames: int) -> np.ndarray:
    """The video of a scene: uint8 [num_frames, H, W, 3] at 16 fps."""
    num_frames = as_int(num_frames, "num_frames", minimum=1)
    h, w = scene.height, scene.width
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    fg = np.array(COLOURS[scene.colour], np.float32)
    out = np.empty((num_frames, h, w, 3), np.uint8)
    for i, centre in enumerate(scene.trajectory(num_frames)):
        cov = shape_coverage(scene.shape, tuple(centre), scene.radius, h, w)[..., None]
        out[i] = np.round(bg * (1 - cov) + fg * cov).astype(np.uint8)
    return out


def dataset(num_videos: int, num_frames: int, *, seed: int = 0, height: int = 64, width: int = 64):
    """``num_videos`` scenes (seeds seed, seed+1, ...) and their videos: (list[Scene], uint8 [N, T, H, W, 3])."""
    scenes = [sample_scene(seed + i, height, width) for i in range(num_videos)]
    return scenes, np.stack([render(s, num_frames) for s in scenes])


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt names (shape, colour, motion, size, speed, background); unnamed ones are None.

    Used by evaluation to know what a generated video should show. The background defaults to
    black when the prompt names none, as in ``sample_scene``.
    """
    words = prompt.lower().replace(",", " ").split()
    text = " ".join(words)

    def find(options):
        hits = [o for o in options if o in words]
        return hits[0] if hits else None

    background = None
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in BACKGROUNDS:
            background = words[i - 1]
            words = words[: i - 1] + words[i + 1 :]  # the background's colour word is not the shape's
    colour = find(tuple(COLOURS))
    motion = next((m for m in MOTIONS if m in text), None)
    speed = (
        "slow"
        if ("slowly" in words or "slow" in words)
        else "fast"
        if ("quickly" in words or "fast" in words)
        else None
    )
    return {
        "shape": find(SHAPES),
        "colour": colour,
        "motion": motion,
        "size": find(tuple(SIZES)),
        "speed": speed,
        "background": background or DEFAULT_BACKGROUND,
    }
