"""The torch Streamer end to end on a tiny random model directory."""

import numpy as np
import pytest
import torch

from rf_runtime import InputError, Streamer, StreamSettings
from rf_runtime.backends.base import to_uint8_frames
from rf_runtime.models.rollout import generate_latents
from rf_runtime.sampler import chunk_noise
from rf_runtime.testing import HEIGHT, TEXT, WIDTH, write_model_dir


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def streamer(model_dir):
    return Streamer.from_checkpoint(model_dir)


def test_chunk_sizes_and_frame_format(streamer):
    chunks = list(streamer.stream("a red circle bouncing", seed=1, num_frames=9 + 12 * 3))
    assert [len(c) for c in chunks] == [9, 12, 12, 12]
    for frames in chunks:
        assert frames.dtype == np.uint8 and frames.shape[1:] == (HEIGHT, WIDTH, 3)


def test_num_frames_is_exact_and_unbounded_stream_keeps_going(streamer):
    assert sum(len(f) for f in streamer.stream("a blue square", num_frames=25)) == 25
    assert [len(f) for f in streamer.stream("a blue square", num_frames=5)] == [5]
    gen = streamer.stream("a blue square")  # unbounded: take a few chunks and stop
    assert [len(next(gen)) for _ in range(4)] == [9, 12, 12, 12]
    gen.close()


def test_same_seed_same_video_other_seed_differs(streamer):
    a = np.concatenate(list(streamer.stream("a green triangle", seed=5, num_frames=21)))
    b = np.concatenate(list(streamer.stream("a green triangle", seed=5, num_frames=21)))
    c = np.concatenate(list(streamer.stream("a green triangle", seed=6, num_frames=21)))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_stream_equals_reference_functions(streamer):
    """The chunk loop with numpy noise == generate_latents on the same noise + a full VAE decode."""
    be = streamer.backend
    settings, (h, w) = streamer.settings, streamer.info.latent_hw
    rng = np.random.Generator(np.random.PCG64(11))
    noise, ren = zip(*(chunk_noise(rng, settings, (1, 16, h, w)) for _ in range(4)))
    noise = torch.from_numpy(np.concatenate(noise, axis=1))
    ren = torch.from_numpy(np.concatenate(ren, axis=2))
    text = torch.from_numpy(TEXT.encode(["a yellow star spinning"]))
    x0 = generate_latents(be.dit, text, noise, ren, settings)
    with torch.no_grad():
        pixels = be.vae.decode(x0.transpose(1, 2))[0].numpy()
    expect = to_uint8_frames(pixels)
    got = np.concatenate(list(streamer.stream("a yellow star spinning", seed=11, num_frames=len(expect))))
    assert got.shape == expect.shape == (9 + 36, HEIGHT, WIDTH, 3)
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1  # uint8 frames may differ by one level


def test_settings_come_from_the_model_card(tmp_path):
    write_model_dir(tmp_path, stream={"ema_alpha": 0.5, "window_frames": 9})
    s = Streamer.from_checkpoint(tmp_path)
    assert s.settings == StreamSettings(ema_alpha=0.5, window_frames=9)
    assert s.info.frame_hw == (HEIGHT, WIDTH)


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_bad_prompt(streamer, prompt):
    with pytest.raises(InputError, match="prompt"):
        streamer.stream(prompt)


def test_bad_arguments(streamer, tmp_path):
    with pytest.raises(InputError, match="num_frames"):
        streamer.stream("a red circle", num_frames=0)
    with pytest.raises(InputError, match="seed"):
        streamer.stream("a red circle", seed=-1)
    from rf_runtime.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        Streamer.from_checkpoint(tmp_path / "missing")
