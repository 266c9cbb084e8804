"""rf_runtime.eval on procedural videos whose answers are known."""

import math

import numpy as np
import pytest

from rf_runtime import eval as E
from rf_runtime.world import procedural as P


def scene(shape="square", colour="red", velocity=(2.0, 0.0), background="black", size="big"):
    return P.Scene(
        shape, colour, size, "fast", "moving right", background, start=(24.0, 30.0), velocity=velocity
    )


@pytest.mark.parametrize("shape", P.SHAPES)
@pytest.mark.parametrize("velocity", [(3.0, -2.0), (0.9, 0.0), (1.3, 1.3), (0.0, -4.4)])
def test_optical_flow_measures_the_true_displacement(shape, velocity):
    video = P.render(scene(shape=shape, velocity=velocity, size="small", background="gray"), 2)
    flow = E.optical_flow(video[0], video[1])
    assert np.abs(flow[:4, :4]).max() < 0.05  # flat background far from the shape: no motion
    # VBench's score (top 5 % of magnitudes) is the shape's displacement
    assert E.flow_score(flow) == pytest.approx(math.hypot(*velocity), rel=0.1)


def test_vbench_dynamic_rule_by_hand():
    # 16 pairs -> count_num = round(4 * 17 / 16) = 4; threshold at 64 px = 1.5; the last 2 are ignored
    scores = np.array([2.0] * 5 + [0.0] * 9 + [9.0, 9.0])
    assert E.is_dynamic(scores, (64, 64))  # 5 > 4
    scores[0] = 1.0
    assert not E.is_dynamic(scores, (64, 64))  # 4 is not > 4, and the trailing 9s do not count


def test_static_video_has_no_dynamics_and_a_moving_one_has():
    moving = P.render(scene(velocity=(2.2, 0.0), size="small"), 16 * 6)
    static = np.repeat(moving[:1], len(moving), axis=0)
    r_static = E.evaluate(static, "a small red square", segment_seconds=3)
    r_moving = E.evaluate(moving, "a small red square", segment_seconds=3)
    assert r_static.dynamic_degree == 0.0 and r_static.flow_score == 0.0
    assert r_moving.dynamic_degree == 100.0
    # 2.2 px per frame, pairs at 8 fps (every 2nd frame): 4.4 px; the few pairs around a bounce move less
    assert r_moving.flow_score == pytest.approx(4.4, rel=0.1)
    assert np.median(E.dynamic_scores(moving)) == pytest.approx(4.4, rel=0.03)
    assert r_static.subject_consistency == pytest.approx(100.0)
    assert r_moving.subject_consistency > 99.0


def test_travel_tells_a_crossing_shape_from_one_standing_still():
    moving = P.render(scene(velocity=(1.0, 0.0), size="small"), 30)  # 29 px to the right, no bounce
    spread, speed = E.travel(moving)
    assert spread == pytest.approx(0.9 * 29, abs=0.5)  # 95th - 5th percentile of a uniform sweep of 29 px
    assert speed == pytest.approx(1.0, abs=0.02)
    assert E.travel(np.repeat(moving[:1], 30, axis=0)) == (0.0, 0.0)
    assert E.travel(np.zeros((5, 16, 16, 3), np.uint8)) == (0.0, 0.0)  # nothing to follow


def test_drift_is_the_change_of_frame_statistics_first_to_last_segment():
    frames = np.full((16 * 10, 16, 16, 3), 100, np.uint8)
    frames[16 * 5 :] = 130  # the second 5 s segment is brighter, still uniform
    r = E.evaluate(frames, segment_seconds=5)
    assert r.segments == 2
    assert r.drift == pytest.approx(3 * 30 / 7)  # mean R, G, B move by 30; stds and gradient stay 0
    assert E.evaluate(frames[: 16 * 5], segment_seconds=2.5).drift == 0.0


def test_subject_consistency_drops_when_the_subject_changes_colour():
    red = P.render(scene(colour="red"), 16)
    blue = P.render(scene(colour="blue"), 16)
    # red and blue share no histogram cell: t = 1..15 score 1, t = 16 scores 0 (first and previous
    # are red), t = 17..31 score (0 + 1) / 2 -> (15 + 0 + 7.5) / 31
    assert E.subject_consistency(np.concatenate([red, blue])) == pytest.approx(100 * 22.5 / 31, abs=0.5)
