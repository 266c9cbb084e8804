"""Switch the prompt of a running stream: the scene changes without a cut (LongLive's re-cache).

    python examples/prompt_switch.py --out switch.mp4

Every ``--every`` chunks the next prompt takes over; the frames before and after the switch come
from one continuous stream. Needs rf_runtime[video] for the MP4.
"""

import argparse

from rf_runtime import Streamer
from rf_runtime.video import Mp4Writer

PROMPTS = ["a red circle bouncing", "a blue square moving left", "a green triangle on a gray background"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", help="engine bundle or model folder (default: the bundle that ships with rf_runtime)"
    )
    p.add_argument("--every", type=int, default=4, help="chunks per prompt (default 4)")
    p.add_argument("--out", required=True, help="the .mp4 to write")
    args = p.parse_args(argv)

    streamer = Streamer.load(args.model)
    stream = streamer.open(PROMPTS[0], seed=0)
    writer = Mp4Writer(args.out, fps=streamer.fps)
    try:
        for chunk in stream:
            writer.write(chunk.frames)
            done = chunk.index + 1
            if done == args.every * len(PROMPTS):
                break
            if done % args.every == 0:
                stream.set_prompt(PROMPTS[done // args.every])  # takes effect from the next chunk
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for index, prompt in stream.prompt_history:
        print(f"from chunk {index}: {prompt!r}")
    print(f"wrote {args.out}: {writer.frames_written} frames")


if __name__ == "__main__":
    main()
