"""Which palette colour the teacher draws for each prompted colour (docs/notes/world.md, sixth session).

    python scripts/teacher_colours.py --teacher T.safetensors --vae V.safetensors [--guidance 3] [--seeds 2]

For every colour of the world it samples "a big COLOUR circle moving right" (black background) from
the bidirectional teacher with CFG, decodes it with the VAE and counts, over the frames, the colour
the prompt-following check reads (``rf_runtime.world.follow.frame_checks``: the object's median
colour, nearest in the palette, None when no palette colour is within tolerance).
"""

from __future__ import annotations

import argparse
import collections

import torch

from rf_runtime.world import procedural
from rf_runtime.world import training as T
from rf_runtime.world.diagnose import _teacher_sample
from rf_runtime.world.follow import frame_checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, vae, dit = T.WorldConfig(), T.load_vae(args.vae), T.load_dit(args.teacher)
    for colour in procedural.COLOURS:
        seen: collections.Counter = collections.Counter()
        for seed in range(args.seeds):
            video = _teacher_sample(dit, vae, cfg, f"a big {colour} circle moving right", args.guidance, seed)
            seen.update(frame_checks(video, "black").colour)
        total = sum(seen.values())
        counts = ", ".join(f"{k or 'none'} {v}" for k, v in seen.most_common())
        print(f"{colour:7s} {seen[colour]:3d} of {total} frames; read as: {counts}")


if __name__ == "__main__":
    main()
