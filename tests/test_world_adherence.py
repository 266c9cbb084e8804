"""The procedural world's prompt adherence (rf_runtime/world/adherence.py), plugged into rf_runtime.eval,
on procedural videos whose answers are known."""

import json

import numpy as np
import pytest

from rf_runtime import eval as E
from rf_runtime.errors import InputError
from rf_runtime.world import adherence as A
from rf_runtime.world import procedural as P


def scene(shape="square", colour="red", velocity=(2.0, 0.0), background="black", size="big"):
    return P.Scene(
        shape, colour, size, "fast", "moving right", background, start=(24.0, 30.0), velocity=velocity
    )


def test_the_right_colour_and_shape_score_higher_than_wrong_ones():
    for shape in P.SHAPES:
        video = P.render(scene(shape=shape, colour="green", background="gray"), 16)
        right = A.evaluate(video, f"a green {shape} on a gray background")
        assert right.colour_score > 0.95 and right.shape_score == 1.0
        assert right.prompt_adherence > 97.0
        wrong_colour = A.evaluate(video, f"a blue {shape} on a gray background")
        assert wrong_colour.colour_score < 0.05
        other = next(s for s in P.SHAPES if s != shape)
        assert A.evaluate(video, f"a green {other} on a gray background").shape_score == 0.0
    # a prompt without a procedural colour and shape gives no adherence
    assert A.evaluate(video, "a sunset over the sea").prompt_adherence is None


def test_quality_drift_sees_a_shape_dissolving_into_noise():
    video = P.render(scene(), 16 * 4)
    rng = np.random.default_rng(0)
    video[16 * 2 :] = rng.integers(0, 256, size=video[16 * 2 :].shape, dtype=np.uint8)
    r = A.evaluate(video, "a red square", segment_seconds=2)
    assert r.per_segment["palette_quality"][0] == pytest.approx(100.0, abs=1.0)
    assert r.quality_drift > 50.0
    assert r.subject_consistency < 90.0


def test_report_json_and_table_and_bad_input():
    r = A.evaluate(P.render(scene(), 32), "a red square")
    data = json.loads(r.to_json())
    assert data["prompt_adherence"] == pytest.approx(r.prompt_adherence)
    assert "dynamic degree %" in r.table()
    with pytest.raises(InputError, match="uint8"):
        A.evaluate(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="at least 2 frames"):
        A.evaluate(np.zeros((1, 8, 8, 3), np.uint8))


def test_generic_evaluation_knows_no_world():
    video = P.render(scene(), 32)
    generic = E.evaluate(video, "a red square")  # no prompt check: no adherence, the other metrics the same
    world = A.evaluate(video, "a red square")
    assert generic.prompt_adherence is None and generic.colour_score is None and world.prompt_adherence > 97.0
    assert generic.drift == world.drift and generic.subject_consistency == world.subject_consistency
