"""Does a chunk cost more the longer a stream runs, or is the machine slowing down under it?

    python scripts/stream_drift.py [--bundle engines/procedural-world-64] [--chunks 250] [--every 10]

One process, one loaded bundle, one intra-op thread per graph: stream A for ``--chunks`` chunks, then a
fresh stream B for 50 on the same sessions. Every ``--every`` chunks (between chunks, outside their
timing) a fixed probe times the machine itself: onnxruntime's MatMul on [512, 512] x [512, 512], one
thread, best of 5 (``rf_runtime.profile.sgemm_peak``). Per window of 50 chunks it prints the median
thread CPU time of a chunk, the median probe time and their ratio. A cost that grows with the stream
shows as a rising ratio in A and a drop back at the start of B; a machine that slows (another
process taking the memory bandwidth or the shared cache, the CPU's clock) moves chunk and probe
together and leaves the ratio flat (docs/notes/speed.md, "203 chunks against 100").
"""

import argparse
import time

import numpy as np

from rf_runtime import Streamer
from rf_runtime.profile import sgemm_peak


def probe_ms() -> float:
    return 1e3 * sgemm_peak(n=512, repeats=5)["cpu_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="engines/procedural-world-64")
    parser.add_argument("--chunks", type=int, default=250)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--prompt", default="a red fox running through fresh snow")
    args = parser.parse_args()
    streamer = Streamer.from_engine(args.bundle, threads=1)
    for name, chunks in (("A", args.chunks), ("B", 50)):
        stream = streamer.open(args.prompt, seed=0)
        cpu, probes = [], []
        for i in range(chunks):
            start = time.thread_time()
            next(stream)
            cpu.append(1e3 * (time.thread_time() - start))
            if i % args.every == 0:
                probes.append((i, probe_ms()))
        for a in range(0, chunks, 50):
            window = cpu[max(a, 1) : a + 50]  # chunk 0 (the first frame, warm-up) not counted
            p = np.median([ms for i, ms in probes if a <= i < a + 50])
            c = np.median(window)
            print(
                f"stream {name} chunks {a:4d}-{min(a + 50, chunks) - 1:4d}: chunk CPU {c:6.2f} ms, "
                f"probe {p:5.2f} ms, chunk / probe {c / p:6.2f}"
            )


if __name__ == "__main__":
    main()
