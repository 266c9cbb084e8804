"""``rf-bench --estimate`` (rf_runtime/memory.py): the memory of a stream from a bundle's manifest.

Checked against two independent things: the buffers ``EngineBackend.new_stream`` really allocates on
the tiny bundle (every per-stream part, byte for byte), and the arithmetic of the tiny config worked by
hand from rf_runtime.testing's constants (L = 2 layers, dim 32 = 2 heads x 16, text_len 8, latent 4 x 6
so T = 2 x 3 = 6 tokens per frame, chunk 3, sink 3, window 6 so M = 6 context frames).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

from rf_runtime import memory  # noqa: E402
from rf_runtime.testing import DIT, TEXT  # noqa: E402

L, DIM, HEADS, FFN, TEXT_LEN = DIT.num_layers, DIT.dim, DIT.num_heads, DIT.ffn_dim, TEXT.text_len
T, C, M = 2 * 3, 3, 3 + 6 - 3
F32 = 4


def stream_buffers(backend, state, text) -> int:
    """Bytes of every distinct buffer a stream holds (views counted through their base)."""
    s = state.device
    found = {}

    def add(buffer):
        while getattr(buffer, "base", None) is not None:
            buffer = buffer.base
        found[id(buffer)] = buffer.nbytes

    for binding in (s.dit, *s.updates, s.vae_first, *s.vae):
        for buffer in binding.buffers.values():
            add(buffer)
    for buffer in (*s.kv[0], *s.kv[1], *s.x, s.x0, *s.latents, *text):
        add(buffer)
    shared = {
        id(b) for table in (*backend._steps, *backend._states, backend._ctx_tables) for b in table.values()
    }
    shared |= {id(b) for b in backend._mixes}
    return sum(n for i, n in found.items() if i not in shared) + s.scratch.nbytes


def test_per_stream_parts_are_the_buffers_a_stream_allocates(engine_dirs):
    from rf_runtime.backends.engine import EngineBackend

    backend = EngineBackend.load(engine_dirs[1])
    text = backend.encode_prompt("a red fox")
    state = backend.new_stream(text)
    (row,) = memory.estimates(memory.read_bundle(engine_dirs[1]), "cpu")
    assert row.per_stream == stream_buffers(backend, state, text)


def test_estimate_against_the_tiny_config_by_hand(engine_dirs):
    bundle = memory.read_bundle(engine_dirs[1])
    row = memory.estimate(bundle, "onnxruntime", "fp32")
    kv = L * M * T * DIM * F32  # one of ctx_k / ctx_v
    assert row.parts["kv_cache"] == 2 * 2 * kv == 36864
    assert row.parts["new_kv"] == 2 * L * C * T * DIM * F32 == 9216
    assert row.parts["text_kv"] == 2 * L * TEXT_LEN * DIM * F32 == 4096
    x = C * 16 * 4 * 6 * F32  # [1, f, C, H, W]
    frames = 3 * 4 * 32 * 48 * F32  # [1, 3, 4 video frames, 32, 48]; the first latent frame gives 1
    assert row.parts["latents"] == (4 + 2) * x + 3 * frames + frames // 4
    graphs = bundle.manifest["graphs"]
    files = bundle.manifest["files"]
    on_disk = sum(
        os.path.getsize(os.path.join(engine_dirs[1], files[key]["path"]))
        for g in ("text_kv", "dit_step", "cache_update", "vae_decode_first", "vae_decode")
        for key in (graphs[g]["file"], *graphs[g].get("external_data", ()))
    )
    assert row.parts["weights"] == on_disk
    q, k = C * T, (M + C) * T
    dit_step = 3 * F32 * HEADS * q * k + 2 * k * DIM * F32 + 2 * q * FFN * F32 + 6 * q * DIM * F32
    acts = memory.activation_bytes(
        bundle.manifest["model"]["dit"],
        bundle.manifest["stream"],
        {g: bundle.graphs[g] for g in ("text_kv", "dit_step", "cache_update", "vae_decode")},
    )
    assert acts["dit_step"] == dit_step == 57888
    assert acts["cache_update"] == 2 * 2 * L * k * DIM * F32
    three = memory.estimate(bundle, "onnxruntime", "fp32", streams=3)
    assert row.parts["runtime"] == int(memory.RUNTIME_OVERHEAD["onnxruntime"] * on_disk)
    shared = row.parts["weights"] + row.parts["runtime"] + row.parts["activations"]
    assert three.total == shared + 3 * row.per_stream


def test_cli_is_torch_free_and_refuses_what_does_not_fit(engine_dirs):
    code = (
        "import sys; from rf_runtime.cli import bench_main; "
        "rc = bench_main(['--estimate', sys.argv[1], '--device-memory', sys.argv[2]]); "
        "print('rc', rc, 'torch' in sys.modules)"
    )
    run = lambda gib: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(engine_dirs[1]), gib], capture_output=True, text=True, timeout=120
    )
    fits = run("64")
    assert "rc 0 False" in fits.stdout, fits.stderr
    assert "onnxruntime  fp32" in fits.stdout and "fits" in fits.stdout
    small = run("0.001")  # 1 MiB: the tiny bundle needs about 4 MiB
    assert "rc 1 False" in small.stdout, small.stderr
    assert "DOES NOT FIT" in small.stdout
    assert "error:" in small.stderr and "needs" in small.stderr and "fewer streams" in small.stderr


def test_device_memory_of_this_machine_is_read():
    free, source = memory.device_memory("cpu")
    assert 0 < free and source
    with pytest.raises(memory.RFError, match="unknown device"):
        memory.device_memory("tpu")


def test_loading_a_bundle_too_large_for_the_device_warns_first(engine_dirs, monkeypatch, caplog):
    from rf_runtime.backends import engine

    monkeypatch.setattr(memory, "device_memory", lambda device: (1 << 20, "test"))  # 1 MiB free
    with caplog.at_level("WARNING", logger="rf_runtime"):
        engine.EngineBackend.load(engine_dirs[1])
    (warning,) = [r.getMessage() for r in caplog.records if "needs about" in r.getMessage()]
    assert "onnxruntime fp32" in warning and "1.0 MiB free" in warning and "rf-bench --estimate" in warning
    caplog.clear()
    monkeypatch.setattr(memory, "device_memory", lambda device: (64 << 30, "test"))
    with caplog.at_level("WARNING", logger="rf_runtime"):
        engine.EngineBackend.load(engine_dirs[1])
    assert not [r for r in caplog.records if "needs about" in r.getMessage()]
