"""The held-out evaluation prompts of the procedural world, and the training scenes that never show them.

The held-out prompts are sentences of the world's grammar (``procedural.describe``) chosen to cover
every shape, colour, motion and background (gray and white included). Training data (``rf-world
encode``) and the DMD prompt list (``rf-world prompts``) come from ``training_scenes``, which drops
every scene whose prompt is one of them, so a model is scored on prompts it has never been trained on.
``configs/world_heldout_prompts.txt`` is the same list, one per line (for ``rf-eval --prompts-file``).
"""

from __future__ import annotations

from rf_runtime.errors import InputError
from rf_runtime.world import procedural

HELDOUT_PROMPTS: tuple[str, ...] = (
    "a green triangle moving right",
    "a blue circle moving up on a gray background",
    "a small yellow square bouncing on a white background",
    "a big purple circle moving down slowly",
    "a red square moving left quickly on a gray background",
    "a white triangle bouncing on a black background",
    "a small green square moving up quickly",
    "a big blue triangle moving left on a white background",
    "a yellow circle moving right slowly on a gray background",
    "a purple square bouncing",
    "a red triangle moving down on a white background",
    "a small white circle moving left slowly on a gray background",
)
_HELDOUT = frozenset(HELDOUT_PROMPTS)


def is_heldout(prompt: str) -> bool:
    return " ".join(prompt.lower().split()) in _HELDOUT


def training_scenes(
    count: int, seed: int, height: int = 64, width: int = 64, balance_backgrounds: bool = True
) -> list[procedural.Scene]:
    """``count`` scenes from seeds seed, seed + 1, ... with every held-out prompt skipped.

    balance_backgrounds: take black, gray and white backgrounds a third each (``sample_scene`` alone
    gives black two thirds of the time, since a prompt that names no background means black), so the
    model sees gray and white as often as black. Deterministic in (count, seed)."""
    names = list(procedural.BACKGROUNDS)
    quota = {b: -(-count // len(names)) for b in names} if balance_backgrounds else None
    scenes, s = [], seed
    while len(scenes) < count:
        scene = procedural.sample_scene(s, height, width)
        s += 1
        if is_heldout(scene.prompt):
            continue
        if quota is not None:
            if quota[scene.background] == 0:
                continue
            quota[scene.background] -= 1
        scenes.append(scene)
    return scenes


def scene_of(prompt: str, seed0: int = 1_000_000, tries: int = 100_000) -> procedural.Scene:
    """The first scene the world draws (seeds seed0, seed0 + 1, ...) whose prompt is exactly ``prompt``:
    the world's ground truth of that prompt (held-out prompts included: this is for evaluation)."""
    for seed in range(seed0, seed0 + tries):
        scene = procedural.sample_scene(seed)
        if scene.prompt == prompt:
            return scene
    raise InputError(
        f"the world draws no scene with the prompt {prompt!r} in {tries} seeds: use a sentence of its grammar"
    )


def read_prompts_file(path: str) -> list[str]:
    """Prompts of the world, one per line (blank lines skipped), e.g. configs/world_heldout_prompts.txt.
    Raises InputError when the file is missing, empty or holds a sentence that names no shape, colour
    and motion of the world."""
    import os

    if not os.path.isfile(path):
        raise InputError(f"prompts file {path} does not exist: give a text file with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts: write one prompt per line")
    for prompt in prompts:
        said = procedural.parse_prompt(prompt)
        if not (said["shape"] and said["colour"] and said["motion"]):
            raise InputError(
                f"{prompt!r} in {path} is not a prompt of the procedural world: it must name a shape, "
                "a colour and a motion (see configs/world_heldout_prompts.txt)"
            )
    return prompts
