"""The held-out prompts are of the world's grammar, and the training data never shows them."""

import os

from rf_runtime.world import procedural
from rf_runtime.world.heldout import HELDOUT_PROMPTS, is_heldout, training_scenes

ENCODE_SEED, PROMPTS_SEED = 1_000_000, 2_000_000  # the defaults of `rf-world encode` and `rf-world prompts`


def test_the_config_file_is_the_list():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "world_heldout_prompts.txt")
    assert tuple(open(path).read().splitlines()) == HELDOUT_PROMPTS


def test_each_heldout_prompt_is_a_sentence_the_world_writes():
    for prompt in HELDOUT_PROMPTS:
        a = procedural.parse_prompt(prompt)
        words = prompt.split()
        size = a["size"] if a["size"] in words else None
        speed = a["speed"] if ("slowly" in words or "quickly" in words) else None
        background = a["background"] if "background" in words else None
        assert procedural.describe(a["shape"], a["colour"], size, speed, a["motion"], background) == prompt
    covered = [procedural.parse_prompt(p) for p in HELDOUT_PROMPTS]
    assert {a["shape"] for a in covered} == set(procedural.SHAPES)
    assert {a["colour"] for a in covered} == set(procedural.COLOURS)
    assert {a["motion"] for a in covered} == set(procedural.MOTIONS)
    assert {a["background"] for a in covered} == set(procedural.BACKGROUNDS)


def test_training_scenes_never_show_a_heldout_prompt_although_the_world_draws_them():
    raw = {procedural.sample_scene(ENCODE_SEED + i).prompt for i in range(4000)}
    assert len([p for p in HELDOUT_PROMPTS if p in raw]) >= 8  # without the filter they would be trained on
    for seed, count in ((ENCODE_SEED, 4000), (PROMPTS_SEED, 1000)):
        scenes = training_scenes(count, seed)
        assert len(scenes) == count and not any(is_heldout(s.prompt) for s in scenes)
    assert is_heldout("  A purple square   bouncing ") and not is_heldout("a purple square bouncing quickly")


def test_training_backgrounds_are_balanced_and_deterministic():
    scenes = training_scenes(300, 7)
    counts = {b: sum(s.background == b for s in scenes) for b in procedural.BACKGROUNDS}
    assert counts == {"black": 100, "gray": 100, "white": 100}
    unbalanced = training_scenes(300, 7, balance_backgrounds=False)
    assert (
        sum(s.background == "black" for s in unbalanced) > 150
    )  # sample_scene alone: about two thirds black
    assert [s.prompt for s in training_scenes(300, 7)] == [s.prompt for s in scenes]


def test_the_committed_dmd_prompt_list_holds_no_heldout_prompt():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "world_prompts.txt")
    prompts = open(path).read().splitlines()
    assert len(prompts) == 500 and not [p for p in prompts if is_heldout(p)]
    assert prompts == [s.prompt for s in training_scenes(500, PROMPTS_SEED)]  # what `rf-world prompts` writes
