"""The procedural world: deterministic, prompts match the ground truth, shapes move and stay in frame."""

import numpy as np
import pytest

from rf_runtime.errors import InputError
from rf_runtime.world import procedural as P


def test_same_seed_same_video_and_different_seeds_differ():
    a, b = P.sample_scene(7), P.sample_scene(7)
    assert a == b
    np.testing.assert_array_equal(P.render(a, 20), P.render(b, 20))
    assert P.sample_scene(8) != a


@pytest.mark.parametrize("seed", range(40))
def test_prompt_names_the_true_attributes(seed):
    scene = P.sample_scene(seed)
    said = P.parse_prompt(scene.prompt)
    assert said["shape"] == scene.shape
    assert said["colour"] == scene.colour
    assert said["motion"] == scene.motion
    assert said["background"] == scene.background
    assert said["size"] in (None, scene.size)
    assert said["speed"] in (None, scene.speed)
    assert scene.colour != scene.background


def test_parse_prompt_of_the_readme_prompt():
    assert P.parse_prompt("a red circle bouncing") == {
        "shape": "circle",
        "colour": "red",
        "motion": "bouncing",
        "size": None,
        "speed": None,
        "background": "black",
    }
    said = P.parse_prompt("a small white square moving left on a gray background")
    assert (said["colour"], said["background"], said["size"]) == ("white", "gray", "small")


def test_first_frame_pixels_are_the_colours_of_the_scene():
    scene = P.Scene(
        "square", "red", "big", "slow", "moving left", "gray", start=(32.0, 32.0), velocity=(-1.0, 0.0)
    )
    frame = P.render(scene, 1)[0]
    np.testing.assert_array_equal(frame[32, 32], P.COLOURS["red"])  # the centre
    np.testing.assert_array_equal(frame[0, 0], P.BACKGROUNDS["gray"])  # a corner
    # a square of half side 0.85 * radius: 0.85 * 0.2 * 64 = 10.9 pixels around the centre
    red = np.all(frame == P.COLOURS["red"], axis=-1)
    assert 20 * 20 <= red.sum() <= 22 * 22


def test_the_shape_moves_at_the_scene_velocity():
    scene = P.Scene(
        "circle", "blue", "small", "fast", "moving right", "black", start=(20.0, 30.0), velocity=(2.0, 0.0)
    )
    video = P.render(scene, 8).astype(np.float64)
    weight = video[..., 2]  # blue channel: the shape's mass
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    cx = (weight * xs).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))
    np.testing.assert_allclose(np.diff(cx), 2.0, atol=0.05)
    assert np.abs(video[1:] - video[:-1]).mean() > 0.5  # consecutive frames differ: motion happens


@pytest.mark.parametrize("seed", range(10))
def test_bounces_keep_the_shape_inside_the_frame(seed):
    scene = P.sample_scene(seed)
    traj = scene.trajectory(16 * 30)  # 30 s: many bounces at any speed
    r = scene.radius
    assert traj[:, 0].min() >= r - 1e-9 and traj[:, 0].max() <= scene.width - r + 1e-9
    assert traj[:, 1].min() >= r - 1e-9 and traj[:, 1].max() <= scene.height - r + 1e-9
    steps = np.linalg.norm(np.diff(traj, axis=0), axis=1)
    speed = np.hypot(*scene.velocity)
    assert np.all(steps <= speed + 1e-9)  # reflection never jumps
    assert np.median(steps) == pytest.approx(speed)  # and away from walls it moves at full speed
    # it really bounces: the centre reaches both ends of its range along its direction of motion
    axis = int(abs(scene.velocity[1]) > abs(scene.velocity[0]))
    extent = (scene.width, scene.height)[axis] - 2 * r
    assert np.ptp(traj[:, axis]) > 0.95 * extent


def test_video_shape_and_dtype_and_bad_input():
    video = P.render(P.sample_scene(0, height=48, width=80), 5)
    assert video.shape == (5, 48, 80, 3) and video.dtype == np.uint8
    with pytest.raises(InputError, match="num_frames"):
        P.render(P.sample_scene(0), 0)
    with pytest.raises(InputError, match="unknown shape"):
        P.shape_coverage("hexagon", (5, 5), 3, 16, 16)
