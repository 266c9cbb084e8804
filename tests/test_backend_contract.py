"""The Backend contract (rf_runtime/backends/base.py), run over every backend the way the runner
contract test runs over every runner: the same calls, the same checks, on the same tiny model.

What every backend must do, checked against independent expectations:
- ``info`` describes the geometry the model folder / bundle was made with (sizes by hand);
- ``denoise_step`` returns x0 and the re-noised latents for every step but the last, None after it;
- ``decode`` gives uint8 frames [T, H, W, 3] with T = 1 + s (f - 1) for chunk 0, s f after;
- the state round-trips: ``export_state`` -> ``import_state`` continues with bit-identical frames,
  and the exported arrays have the shapes ``state_shapes`` promises;
- ``geometry`` is plain JSON and the same for both backends of one model;
- the backends agree with each other: the first chunk within 1 uint8 level.
"""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from rf_runtime.sampler import chunk_noise  # noqa: E402
from rf_runtime.testing import HEIGHT, WIDTH  # noqa: E402

BACKENDS = ["torch", "torch-static", "onnxruntime", "tensorrt"]


@pytest.fixture(scope="module")
def backends(engine_dirs):
    from rf_runtime.backends.engine import EngineBackend
    from rf_runtime.backends.pytorch import TorchBackend
    from rf_runtime.backends.pytorch_static import StaticTorchBackend

    model, bundle = engine_dirs
    return {
        "torch": lambda: TorchBackend.from_dir(model),
        "torch-static": lambda: StaticTorchBackend.from_dir(model),
        "onnxruntime": lambda: EngineBackend.load(bundle),
        "tensorrt": lambda: EngineBackend.load(bundle, backend="tensorrt", device="cuda"),
    }


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, backends):
    if request.param == "tensorrt":
        from rf_runtime.backends.select import tensorrt_here

        if tensorrt_here() == (None, None):
            pytest.skip("TensorRT or a CUDA GPU is not available here")
    return backends[request.param]()


def one_chunk(be, state, rng, noise=None):
    """The streamer's recipe for one chunk, over the Backend interface only."""
    s = be.info.settings
    init, fresh = chunk_noise(rng, s, (1, be.info.latent_channels, *be.info.latent_hw), noise)
    x, outs = be.upload(init), []
    for k in range(s.num_steps):
        x0, x = be.denoise_step(state, x, k, be.upload(fresh[k]) if k + 1 < s.num_steps else None)
        outs.append(x)
    be.cache_pass(state, x0)
    return be.decode(state, x0), outs


def test_info_is_the_model_geometry(backend):
    info = backend.info
    assert info.latent_channels == 16 and info.latent_hw == (HEIGHT // 8, WIDTH // 8)
    assert info.frame_hw == (HEIGHT, WIDTH) and info.settings.ema_alpha == 0.9
    assert [info.frames_of_chunk(i) for i in range(3)] == [9, 12, 12]  # stride 4, 3 latent frames per chunk
    assert isinstance(backend.describe()["backend"], str)


def test_steps_and_frames(backend):
    state = backend.new_stream(backend.encode_prompt("a red circle"))
    rng = np.random.Generator(np.random.PCG64(0))
    for index in range(3):
        frames, outs = one_chunk(backend, state, rng)
        assert frames.dtype == np.uint8 and frames.shape == (
            backend.info.frames_of_chunk(index),
            HEIGHT,
            WIDTH,
            3,
        )
        assert outs[-1] is None and all(o is not None for o in outs[:-1])


def test_state_round_trips_bit_exactly(backend):
    rng = np.random.Generator(np.random.PCG64(3))
    state = backend.new_stream(backend.encode_prompt("a blue square"))
    for _ in range(3):  # past the first eviction and fold
        one_chunk(backend, state, rng)
    arrays = backend.export_state(state)
    shapes = backend.state_shapes()
    assert arrays.cache_k.shape == tuple(shapes["kv"]) and arrays.text_k.shape == tuple(shapes["text_kv"])
    assert arrays.latents.shape == tuple(shapes["latents"])
    assert [a.shape for a in arrays.vae_cache] == [tuple(s) for s in shapes["vae_cache"]]
    assert arrays.chunks_committed == 3
    resumed = backend.import_state(arrays, latent_frames_decoded=3 * backend.info.settings.chunk_frames)
    rng_state = rng.bit_generator.state
    a, _ = one_chunk(backend, state, rng)
    rng.bit_generator.state = rng_state
    b, _ = one_chunk(backend, resumed, rng)
    assert np.array_equal(a, b)


def test_geometry_is_json_and_the_same_for_every_backend(backends):
    torch_geometry = backends["torch"]().geometry()
    engine_geometry = backends["onnxruntime"]().geometry()
    assert json.loads(json.dumps(torch_geometry)) == torch_geometry
    assert torch_geometry == engine_geometry == backends["torch-static"]().geometry()


def test_backends_agree_on_the_first_chunk(backends):
    frames = []
    for name in ("torch", "torch-static", "onnxruntime"):
        be = backends[name]()
        frames.append(
            one_chunk(
                be, be.new_stream(be.encode_prompt("a red circle")), np.random.Generator(np.random.PCG64(11))
            )[0].astype(int)
        )
    assert np.array_equal(frames[0], frames[1])  # the static path runs the same ops: bit-identical
    assert np.abs(frames[0] - frames[2]).max() <= 1
