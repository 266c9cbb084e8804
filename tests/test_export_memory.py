"""What keeps the export's peak memory at what one graph needs (docs/notes/export.md, "Export at real
scale"): export/heap.py maps every tensor of 64 KiB or more apart (glibc), so a freed activation goes
back to the system instead of staying in the heap (measured in a fresh process, since glibc's
threshold depends on what the process has freed before); and the DiT's weights are gone before the
graphs that do not need them are traced."""

import ctypes
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, torch
from rf_runtime.export.heap import unpooled_large_tensors

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

kept = []

def mapped_by(nbytes):
    # bytes in mapped blocks that a new float32 tensor of nbytes adds (kept alive: no block is reused)
    before = libc.mallinfo2().hblkhd
    kept.append(torch.empty(nbytes // 4))
    return libc.mallinfo2().hblkhd - before

# glibc raises its threshold to the size of a freed mapped block: after a 16 MiB tensor is freed,
# a 1 MiB one comes from the heap (where, freed, it would stay)
del_me = torch.empty(4 << 20); del del_me
print(mapped_by(1 << 20))
with unpooled_large_tensors():
    print(mapped_by(1 << 20))
    print(mapped_by(32 << 10))  # under 64 KiB: still the heap
print(mapped_by(1 << 20))  # after: glibc's initial 128 KiB threshold, fixed
"""


def test_large_tensors_are_mapped_apart_within_the_export():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2") or not hasattr(libc, "mallopt"):
        pytest.skip("needs glibc 2.33 or later (mallinfo2, mallopt)")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, inside, small, after = (int(v) for v in out.stdout.split())
    assert default == 0  # the heap, under glibc's raised threshold
    assert inside >= 1 << 20  # its own mapping (rounded up to pages, plus the block header)
    assert small == 0
    assert after >= 1 << 20


def test_the_dit_weights_are_gone_before_the_other_graphs_are_traced(tiny_model_dir, tmp_path, monkeypatch):
    """At 480x832 the DiT's 5.7 GB beside the VAE decoder's trace (10 GB) did not fit 16 GiB: the step
    graphs of every batch size are exported first, then the DiT goes to the meta device."""
    pytest.importorskip("onnxruntime")
    from rf_runtime.export import bundle_builder

    seen = []
    step_graph, chunk_graphs = bundle_builder.export_step_graph, bundle_builder.export_chunk_graphs

    def record_step(dit, *args):
        seen.append(("step", all(not p.is_meta for p in dit.parameters())))
        return step_graph(dit, *args)

    def record_chunk(dit, *args):
        seen.append(("chunk", all(p.is_meta for p in dit.parameters())))
        return chunk_graphs(dit, *args)

    monkeypatch.setattr(bundle_builder, "export_step_graph", record_step)
    monkeypatch.setattr(bundle_builder, "export_chunk_graphs", record_chunk)
    bundle_builder.build_bundle(tiny_model_dir, tmp_path / "bundle", batch_sizes=(1, 2))
    assert seen == [("step", True), ("step", True), ("chunk", True), ("chunk", True)]
