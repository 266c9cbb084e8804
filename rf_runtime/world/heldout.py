"""The held-out evaluation prompts of the procedural world, and the training scenes that never show them.

The held-out prompts are sentences of the world's grammar (``procedural.describe``) chosen to cover
every shape, colour, motion and background (gray and white included). Training data (``rf-world
encode``) and the DMD prompt list (``rf-world prompts``) come from ``training_scenes``, which drops
every scene whose prompt is one of them, so a model is scored on prompts it has never been trained on.
``configs/world_heldout_prompts.txt`` is the same list, one per line (for ``rf-eval --prompts-file``).
"""

from __future__ import annotations

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
