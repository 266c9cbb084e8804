"""Headless generation to an MP4 file, as a batch job would do it (rf-generate does the same, with a
progress bar and Ctrl-C handling).

    python examples/headless_mp4.py --out ball.mp4 --seconds 5

The file is written to a temporary name and renamed when complete (``rf_runtime.video.Mp4Writer``).
Needs rf_runtime[video] (imageio + ffmpeg).
"""

import argparse

from rf_runtime import Streamer
from rf_runtime.video import Mp4Writer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", help="engine bundle or model folder (default: the bundle that ships with rf_runtime)"
    )
    p.add_argument("--prompt", default="a red circle bouncing")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .mp4 to write")
    args = p.parse_args(argv)

    streamer = Streamer.load(args.model)
    writer = Mp4Writer(args.out, fps=streamer.fps)  # checks the output path before any work
    try:
        for frames in streamer.stream(
            args.prompt, seed=args.seed, num_frames=round(args.seconds * streamer.fps)
        ):
            writer.write(frames)
        writer.close()
    except BaseException:
        writer.abort()  # no half-written file
        raise
    print(f"wrote {args.out}: {writer.frames_written} frames at {streamer.fps} fps")


if __name__ == "__main__":
    main()
