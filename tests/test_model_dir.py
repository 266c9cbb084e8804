"""The model folder (rf_runtime/model_dir.py): written and read in one place, round-tripped; and
``Streamer.load``, the one entry that tells a model folder from an engine bundle."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rf_runtime import Streamer, model_dir  # noqa: E402
from rf_runtime.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from rf_runtime.sampler import StreamSettings  # noqa: E402
from rf_runtime.testing import HEIGHT, TEXT, WIDTH, tiny_dit, tiny_vae  # noqa: E402


def test_write_then_load_round_trips_every_part(tmp_path):
    dit, vae = tiny_dit(4), tiny_vae(4)
    settings = StreamSettings(ema_alpha=0.5, window_frames=9, timesteps=(1000, 500))
    card = {"name": "round trip", "training_stage": "random"}
    model_dir.write(
        tmp_path / "m",
        dit,
        vae,
        text_encoder=TEXT.to_dict(),
        stream=settings,
        resolution=(16, 48),
        model_card=card,
    )
    assert model_dir.is_model_dir(tmp_path / "m") and not model_dir.is_model_dir(tmp_path)
    m = model_dir.load(tmp_path / "m")
    assert m.settings == settings and m.resolution == (16, 48) and m.card["model_card"] == card
    assert m.text_encoder == TEXT and m.dit.config == dit.config and m.vae.config == vae.config
    for original, loaded in ((dit, m.dit), (vae, m.vae)):
        want, got = original.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), k
    # the card is plain JSON a person can read, its stream settings complete
    with open(tmp_path / "m" / model_dir.CARD) as f:
        raw = json.load(f)
    assert raw["stream"]["timesteps"] == [1000, 500] and raw["resolution"] == [16, 48]
    assert sorted(os.listdir(tmp_path / "m")) == sorted(
        [model_dir.CONFIG, model_dir.CARD, model_dir.DIT_WEIGHTS, "vae.safetensors"]
    )  # no temporary file left


def test_a_card_with_partial_stream_settings_takes_the_defaults(tmp_path):
    model_dir.write(tmp_path, tiny_dit(), tiny_vae(), text_encoder=TEXT.to_dict(), stream={"ema_alpha": 0.25})
    m = model_dir.load(tmp_path, dtype="float32")
    assert m.settings == StreamSettings(ema_alpha=0.25) and m.resolution == model_dir.DEFAULT_HW


def test_bad_folders_and_cards_are_refused_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        model_dir.load(tmp_path / "nothing")
    model_dir.write(tmp_path, tiny_dit(), tiny_vae(), text_encoder=TEXT.to_dict())
    with pytest.raises(ConfigError, match="dtype must be one of"):
        model_dir.load(tmp_path, dtype="float48")
    card = json.loads((tmp_path / model_dir.CARD).read_text())
    (tmp_path / model_dir.CARD).write_text(json.dumps({**card, "stream": {"ema_alfa": 0.5}}))
    with pytest.raises(ConfigError, match="unknown stream settings \\['ema_alfa'\\]"):
        model_dir.read_card(tmp_path)
    (tmp_path / model_dir.CARD).write_text(json.dumps({**card, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        model_dir.read_card(tmp_path)
    (tmp_path / model_dir.CARD).write_text(json.dumps({**card, "text_encoder": {"kind": "clip"}}))
    with pytest.raises(ConfigError, match="text encoder kind 'clip' is not supported"):
        model_dir.load(tmp_path)


def test_streamer_load_tells_a_bundle_from_a_model_folder(engine_dirs, tmp_path, caplog):
    model, bundle = engine_dirs
    with caplog.at_level("INFO", logger="rf_runtime"):
        from_bundle = Streamer.load(bundle)
    assert from_bundle.source == "engine bundle" and from_bundle.backend.name == "onnxruntime"
    assert "engine bundle" in caplog.text
    from_folder = Streamer.load(model)
    assert from_folder.source == "model folder" and from_folder.backend.name == "torch"
    a = next(from_bundle.stream("a red circle", seed=2)).astype(int)
    b = next(from_folder.stream("a red circle", seed=2)).astype(int)
    assert a.shape == b.shape == (9, HEIGHT, WIDTH, 3) and np.abs(a - b).max() <= 1  # the same model
    assert Streamer.load().source == "engine bundle"  # no path: the bundle that ships with rf_runtime


def test_streamer_load_refuses_what_does_not_apply(engine_dirs, tmp_path):
    model, bundle = engine_dirs
    with pytest.raises(InputError, match="is an engine bundle.*height"):
        Streamer.load(bundle, height=64)
    with pytest.raises(InputError, match="is a model folder.*backend='onnxruntime'"):
        Streamer.load(model, backend="onnxruntime")
    with pytest.raises(InputError, match="does not exist: pass an engine bundle"):
        Streamer.load(tmp_path / "missing")
    with pytest.raises(InputError, match="holds neither manifest.json nor config.json"):
        Streamer.load(tmp_path)
