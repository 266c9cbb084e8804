"""The fast PyTorch path (rf_runtime/backends/pytorch_static.py): the same frames as the reference backend, buffers
allocated once per stream, no recompiles under torch.compile; CUDA graphs where a GPU is present."""

import numpy as np
import pytest
import torch

from rf_runtime import Streamer
from rf_runtime.errors import ConfigError, InputError
from rf_runtime.snapshot import StreamSnapshot

CHUNKS = 5  # chunk 3 is the first after an eviction + EMA fold (sink 3, window 6): 2 steady-state chunks


def frames_of(streamer, seed=3, chunks=CHUNKS, switch_at=None):
    stream = streamer.open("a red circle", seed=seed)
    out = []
    for i in range(chunks):
        if i == switch_at:
            stream.set_prompt("a blue square")
        out.append(next(stream).frames)
    return np.concatenate(out), stream


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Streamer.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def static(tiny_model_dir):
    return Streamer.from_checkpoint(tiny_model_dir, static=True)


def test_same_frames_as_the_reference(reference, static):
    want, _ = frames_of(reference)
    got, _ = frames_of(static)
    assert got.shape == want.shape == (9 + 12 * (CHUNKS - 1), 32, 48, 3)
    np.testing.assert_array_equal(got, want)  # the same ops in the same order: bit-identical in fp32


def test_prompt_switch_and_resume_match_the_reference(reference, static, tmp_path):
    want, ref_stream = frames_of(reference, seed=4, chunks=5, switch_at=3)
    got, stream = frames_of(static, seed=4, chunks=5, switch_at=3)
    np.testing.assert_array_equal(got, want)
    path = tmp_path / "s.npz"
    stream.save_state().save(path)
    resumed = static.resume(StreamSnapshot.load(path))
    np.testing.assert_array_equal(next(resumed).frames, next(ref_stream).frames)


def test_buffers_are_allocated_once_per_stream(static):
    be = static.backend
    stream = static.open("a red circle", seed=1)
    next(stream)
    s = stream._state.device
    tensors = {name: v for name, v in vars(s).items() if isinstance(v, torch.Tensor)}
    tensors.update({f"x{i}": t for i, t in enumerate(s.x)}, **{f"slot{i}": t for i, t in enumerate(s.slots)})
    from rf_runtime.backends.pytorch_static import _buffers_key

    key = _buffers_key(s)  # part of every CUDA graph's key
    before = {name: (id(t), t.data_ptr()) for name, t in tensors.items()}
    for _ in range(3):
        next(stream)
    after = {name: (id(t), t.data_ptr()) for name, t in tensors.items()}
    assert after == before and _buffers_key(s) == key  # the same tensors, at the same addresses
    assert [id(t) for t in s.slots] == [before[f"slot{i}"][0] for i in range(len(s.slots))]
    # the outputs land in those buffers: x0 of the last chunk is the stream's x0, the ring slot holds it
    assert torch.equal(s.latents[(stream.chunk_index - 1) % be.info.context_chunks], s.x0)
    assert float(s.cache_k.abs().sum()) > 0 and float(s.slots[0].abs().sum()) > 0


def test_compile_does_not_recompile_after_the_first_chunks(tiny_model_dir, reference):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = Streamer.from_checkpoint(tiny_model_dir, static=True, compile="eager")
    stream = compiled.open("a red circle", seed=3)
    frames = [next(stream).frames for _ in range(4)]  # chunk 3: the steady state's cache state
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the DiT step and the VAE step were compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        frames += [next(stream).frames for _ in range(CHUNKS - 4)]
    assert counters["stats"]["unique_graphs"] == graphs
    want, _ = frames_of(reference)
    np.testing.assert_array_equal(np.concatenate(frames), want)


def test_options_are_checked(tiny_model_dir):
    with pytest.raises(ConfigError, match="CUDA graphs need the model on a CUDA device"):
        Streamer.from_checkpoint(tiny_model_dir, static=True, cuda_graphs=True)
    with pytest.raises(InputError, match="static=True"):
        Streamer.from_checkpoint(tiny_model_dir, compile=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graphs_give_the_eager_frames_and_allocate_nothing(tiny_model_dir):
    eager = Streamer.from_checkpoint(tiny_model_dir, static=True, device="cuda", cuda_graphs=False)
    graphs = Streamer.from_checkpoint(tiny_model_dir, static=True, device="cuda", cuda_graphs=True)
    want, _ = frames_of(eager, chunks=10)
    stream = graphs.open("a red circle", seed=3)
    got, memory = [], []
    for i in range(10):
        got.append(next(stream).frames)
        memory.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert len(stream._state.device.graphs) >= 6  # 4 steps + cache pass + decoder, replayed in steady state
    assert len(set(memory[6:])) == 1  # steady state: not one byte more, allocated or reserved


@pytest.mark.parametrize("static", [False, True], ids=["reference", "static"])
def test_a_bfloat16_model_streams_the_float32_frames_to_bf16_precision(tiny_model_dir, static):
    # The GPU path runs bf16 (scripts/device_check.sh). Its first run on an H200 stopped in the cross-attention
    # LayerNorm (float32 input, bf16 affine weights); the tiny model has the same norms, so a CPU stream shows it.
    want, _ = frames_of(Streamer.from_checkpoint(tiny_model_dir, static=static), chunks=3)
    got, _ = frames_of(Streamer.from_checkpoint(tiny_model_dir, static=static, dtype="bfloat16"), chunks=3)
    diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op); over the tiny model's layers x 4 steps x 3
    # chunks the uint8 frames move by under 1 level on average (0.72 measured), far from a wrong result's range.
    assert 0 < diff.mean() < 2.0, diff.mean()


def test_layer_norm_upcasts_bf16_weights_with_its_input():
    from rf_runtime.models.dit import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(16, 1e-6, elementwise_affine=True)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 16)
    norm16 = LayerNorm(16, 1e-6, elementwise_affine=True).to(torch.bfloat16)
    norm16.load_state_dict(norm.state_dict())
    x16 = x.to(torch.bfloat16)
    xf = x16.double()  # the formula by hand, in float64, from the bf16 inputs and weights
    mean, var = xf.mean(-1, keepdim=True), xf.var(-1, unbiased=False, keepdim=True)
    want = (xf - mean) / torch.sqrt(var + 1e-6) * norm16.weight.double() + norm16.bias.double()
    got = norm16(x16)
    assert got.dtype == torch.bfloat16
    # one bf16 rounding of the result: within half a bf16 step (2^-8 relative), plus fp32 noise near zero
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5)
