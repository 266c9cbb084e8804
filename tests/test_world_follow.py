"""The prompt-following checks: near 100 % on the world's own renders, near 0 on videos that break the prompt."""

import dataclasses

import numpy as np
import pytest

from rf_runtime.errors import InputError
from rf_runtime.world.adherence import evaluate
from rf_runtime.world import procedural as P
from rf_runtime.world.follow import score_prompt
from rf_runtime.world.heldout import HELDOUT_PROMPTS, scene_of

pytest.importorskip("cv2")
SECONDS30 = 30 * P.FPS


@pytest.mark.parametrize("prompt", HELDOUT_PROMPTS)
def test_the_worlds_own_30s_renders_pass_every_check(prompt):
    f = score_prompt(P.render(scene_of(prompt), SECONDS30), prompt)
    assert (f.colour, f.colour_last_fifth, f.background, f.shape, f.one_object) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert f.colour_changes == 0 and f.motion_ok, f.motion
    assert f.motion["reflections"] >= 2  # 30 s of the world always reach the edges


def _scene(**kw):
    base = dict(
        shape="circle",
        colour="red",
        size="small",
        speed="fast",
        motion="moving left",
        background="black",
        start=(40.0, 30.0),
        velocity=(-2.2, 0.0),
    )
    return P.Scene(**{**base, **kw})


def test_wrong_colour_background_and_shape_score_zero():
    video = P.render(_scene(), SECONDS30)
    assert score_prompt(video, "a red circle moving left").colour == 1.0
    assert score_prompt(video, "a blue circle moving left").colour == 0.0
    f = score_prompt(video, "a red square moving left")
    assert f.shape == 0.0 and f.colour == 1.0
    assert score_prompt(video, "a red circle moving left on a gray background").background == 0.0
    gray = P.render(_scene(background="gray"), SECONDS30)
    assert score_prompt(gray, "a red circle moving left on a gray background").background == 1.0
    assert score_prompt(gray, "a red circle moving left on a white background").background == 0.0
    tri = P.render(_scene(shape="triangle", size="big"), SECONDS30)
    assert score_prompt(tri, "a red triangle moving left").shape == 1.0
    assert score_prompt(tri, "a red circle moving left").shape == 0.0


def test_a_coloured_wash_is_not_the_background():
    rng = np.random.default_rng(0)
    t, h, w = 64, 64, 64
    base = rng.uniform(60, 200, size=(t, 1, 1, 3))
    ramp = np.linspace(0, 60, w)[None, None, :, None]
    wash = np.clip(base + ramp + rng.normal(0, 10, (t, h, w, 3)), 0, 255).astype(np.uint8)
    for prompt in (
        "a red circle bouncing on a gray background",
        "a red circle bouncing on a white background",
        "a red circle bouncing",
    ):
        f = score_prompt(wash, prompt)
        assert f.background == 0.0 and f.colour < 0.1


def test_motion_off_the_prompted_axis_or_way_fails():
    def ok(scene, prompt):
        return score_prompt(P.render(scene, SECONDS30), prompt).motion_ok

    left = _scene()
    assert ok(left, "a red circle moving left")
    assert not ok(left, "a red circle moving up")  # horizontal, not vertical
    assert not ok(left, "a red circle bouncing")  # one axis, not diagonal
    assert not ok(_scene(velocity=(2.2, 0.0)), "a red circle moving left")  # the other way first
    assert not ok(_scene(velocity=(0.0, 0.0)), "a red circle moving left")  # still
    diagonal = _scene(velocity=(1.6, 1.5), motion="bouncing")
    assert ok(diagonal, "a red circle bouncing")
    assert not ok(diagonal, "a red circle moving right")


def test_wobbling_in_place_is_not_travel():
    rng = np.random.default_rng(1)
    frames = []
    for i in range(SECONDS30):
        c = (32 + 4 * np.sin(i / 5) + rng.normal(0, 1), 32 + 4 * np.cos(i / 7))
        cov = P.shape_coverage("circle", c, 7.0, 64, 64)[..., None]
        frames.append((np.array(P.COLOURS["red"]) * cov).astype(np.uint8))
    f = score_prompt(np.stack(frames), "a red circle moving left")
    assert not f.motion_ok and f.colour == 1.0


def test_two_objects_and_a_colour_change_are_caught():
    a, b = P.render(_scene(), SECONDS30), P.render(_scene(start=(20.0, 50.0), velocity=(2.2, 0.0)), SECONDS30)
    two = np.maximum(a, b)
    assert score_prompt(two, "a red circle moving left").one_object < 0.2  # apart but where they cross
    half = SECONDS30 // 2
    change = np.concatenate([a[:half], P.render(_scene(colour="green"), SECONDS30)[half:]])
    f = score_prompt(change, "a red circle moving left")
    assert f.colour == pytest.approx(0.5, abs=0.01) and f.colour_last_fifth == 0.0 and f.colour_changes == 1
    assert f.one_object == 1.0


def test_rf_eval_reports_the_checks_and_non_world_prompts_get_none():
    video = P.render(_scene(), 64)
    result = evaluate(video, "a red circle moving left")
    assert result.prompt_following["follow"]["colour"] == 1.0
    assert "follow: colour" in result.table()
    assert evaluate(video, "a cat on a sofa").prompt_following == {}
    assert score_prompt(video, "a red fox running through fresh snow") is None
    with pytest.raises(InputError):
        score_prompt(video[..., 0], "a red circle moving left")


def test_a_stream_truncated_before_the_edges_needs_no_reflection():
    scene = dataclasses.replace(_scene(), speed="slow", velocity=(-0.9, 0.0), start=(40.0, 30.0))
    f = score_prompt(P.render(scene, 24), "a red circle moving left slowly")
    assert f.motion_ok and f.motion["reflections"] == 0
