"""Where the memory of exporting the DiT step goes: peak RSS of the eager forward, of the TorchScript
trace and of ``torch.onnx.export``, for a few layers at the real width, under glibc's default heap
policy and under the export's (rf_runtime/export/heap.py), each case in a fresh process.

    python scripts/trace_memory.py --layers 1 3 --latent 60x104

(60 x 104 is 480x832's latent; random weights, width 1536 as the 1.3B model.) Prints one line per
case: peak RSS of the process, the model and inputs alone, and the time. The growth per layer is
the difference between two layer counts divided by theirs; the weights are 0.19 GiB a layer.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

MODES = ("eager", "trace", "export")
HEAPS = ("default", "export")


def run_case(layers: int, latent_hw: tuple[int, int], mode: str, heap: str) -> str:
    import torch

    from rf_runtime.export.dit_graph import INPUTS, OUTPUTS, DiTStep, example_inputs
    from rf_runtime.export.heap import EXPORT_THRESHOLD, set_mmap_threshold
    from rf_runtime.models import CausalDiT, DiTConfig

    if heap == "export" and not set_mmap_threshold(EXPORT_THRESHOLD):
        return "no glibc mallopt here"
    torch.manual_seed(0)
    dit = CausalDiT(DiTConfig(num_layers=layers)).eval()
    feeds = example_inputs(dit, latent_hw, 6, 3, 6)
    shape = feeds["ctx_k"].shape
    for name in ("ctx_k", "ctx_v"):  # as the bundle builder traces them: a zero broadcast
        feeds[name] = torch.zeros((1,) * len(shape)).expand(shape)
    args = tuple(v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for v in map(feeds.get, INPUTS))
    step = DiTStep(dit)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        if mode == "eager":
            step(*args)
        elif mode == "trace":
            torch.jit.trace(step, args, check_trace=False)
        else:
            torch.onnx.export(
                step,
                args,
                os.path.join(scratch, "dit_step.onnx"),
                input_names=INPUTS,
                output_names=OUTPUTS,
                opset_version=17,
                dynamo=False,
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    took = time.perf_counter() - started
    return f"peak {peak / 2**20:.2f} GiB (model and inputs {base / 2**20:.2f} GiB), {took:.0f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--latent", default="60x104", help="latent H x W (480x832 is 60x104)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--heaps", nargs="+", choices=HEAPS, default=list(HEAPS))
    p.add_argument("--case", nargs=3, metavar=("LAYERS", "MODE", "HEAP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    latent_hw = tuple(int(v) for v in args.latent.split("x"))
    if args.case:  # one case, in this (fresh) process
        print(run_case(int(args.case[0]), latent_hw, args.case[1], args.case[2]), flush=True)
        return 0
    for layers in args.layers:
        for mode in args.modes:
            for heap in args.heaps:
                out = subprocess.run(
                    [sys.executable, __file__, "--latent", args.latent, "--case", str(layers), mode, heap],
                    capture_output=True,
                    text=True,
                )
                result = out.stdout.strip().splitlines()[-1:] or [f"failed: {out.stderr.strip()[-300:]}"]
                print(f"layers {layers} {mode:6s} heap {heap:7s}: {result[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
