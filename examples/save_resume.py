"""Save a stream's state, resume it later (another process, another day), and get the same frames.

    python examples/save_resume.py --snapshot fox.npz

Streams ``--chunks`` chunks without stopping, then again with a save after ``--save-at`` chunks and
a resume from the file; checks that the frames are identical bit for bit and exits 1 if not.
"""

import argparse
import sys

import numpy as np

from rf_runtime import Streamer
from rf_runtime.snapshot import StreamSnapshot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", help="engine bundle or model folder (default: the bundle that ships with rf_runtime)"
    )
    p.add_argument("--prompt", default="a red circle bouncing")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--save-at", type=int, default=3, help="save after this many chunks")
    p.add_argument("--snapshot", required=True, help="the .npz to write (atomic, no pickle)")
    args = p.parse_args(argv)

    streamer = Streamer.load(args.model)
    straight = [c.frames for _, c in zip(range(args.chunks), streamer.open(args.prompt, seed=7))]

    stream = streamer.open(args.prompt, seed=7)
    first = [c.frames for _, c in zip(range(args.save_at), stream)]
    stream.save_state().save(args.snapshot)
    stream.close()
    resumed = streamer.resume(StreamSnapshot.load(args.snapshot))
    rest = [c.frames for _, c in zip(range(args.chunks - args.save_at), resumed)]

    same = all(np.array_equal(a, b) for a, b in zip(straight, first + rest)) and len(first + rest) == len(
        straight
    )
    print(
        f"saved after chunk {args.save_at - 1} to {args.snapshot}; resumed {len(rest)} chunks: "
        + ("frames identical bit for bit" if same else "FRAMES DIFFER")
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
