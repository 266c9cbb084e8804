"""Embed a stream in an application: frames arrive chunk by chunk, as they are generated.

    python examples/embed_stream.py                       # the bundle that ships with rf_runtime
    python examples/embed_stream.py --model tiny-model --seconds 3

``show`` stands for whatever the application does with a frame (a window, a WebRTC track, a
texture); here it keeps the latest frame and counts them. Needs numpy + onnxruntime for a bundle,
torch for a model folder.
"""

import argparse
import time

from rf_runtime import Streamer


class Display:
    """A stand-in for an application's video sink."""

    def __init__(self):
        self.frames_shown = 0
        self.latest = None

    def show(self, frame):  # uint8 [H, W, 3]
        self.latest = frame
        self.frames_shown += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", help="engine bundle or model folder (default: the bundle that ships with rf_runtime)"
    )
    p.add_argument("--prompt", default="a red circle bouncing")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)

    streamer = Streamer.load(
        args.model
    )  # says (in its log and .source) whether it found a bundle or a model folder
    display = Display()
    start = time.perf_counter()
    for chunk in streamer.open(args.prompt, seed=0, num_frames=round(args.seconds * streamer.fps)):
        for frame in chunk.frames:
            display.show(frame)
        print(
            f"chunk {chunk.index}: {len(chunk.frames)} frames from frame {chunk.start_frame} "
            f"in {chunk.seconds * 1000:.0f} ms"
        )
    elapsed = time.perf_counter() - start
    h, w = streamer.info.frame_hw
    print(
        f"showed {display.frames_shown} frames of {w}x{h} from a {streamer.source} "
        f"in {elapsed:.2f} s ({display.frames_shown / elapsed:.1f} fps)"
    )


if __name__ == "__main__":
    main()
