"""The wheel carries the default bundle; Streamer.from_engine() loads it; unknown prompt words are named."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile

import pytest

from rf_runtime.bundle import DEFAULT_ENGINE, ModelCard, default_engine_dir

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_the_wheel_contains_the_default_bundle_byte_for_byte(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ROOT,
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    source = os.path.join(ROOT, "engines", DEFAULT_ENGINE)
    manifest = json.load(open(os.path.join(source, "manifest.json")))
    with zipfile.ZipFile(tmp_path / wheel) as z:
        prefix = f"rf_runtime/engines/{DEFAULT_ENGINE}/"
        names = set(z.namelist())
        assert prefix + "manifest.json" in names
        for entry in manifest["files"].values():
            data = z.read(prefix + entry["path"])
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry[
                "path"
            ]


def test_from_engine_with_no_path_streams_the_shipped_model():
    pytest.importorskip("onnxruntime")
    from rf_runtime.streamer import Streamer

    assert os.path.samefile(default_engine_dir(), os.path.join(ROOT, "engines", DEFAULT_ENGINE))
    streamer = Streamer.from_engine()
    frames = next(iter(streamer.stream("a red circle bouncing", seed=0, num_frames=3)))
    assert frames.shape == (3, 64, 64, 3) and frames.dtype.name == "uint8"


def _card(vocabulary):
    return ModelCard(
        name="m",
        source="s",
        checkpoint=None,
        training_stage="random",
        chunk_frames=3,
        sink_frames=3,
        window_frames=6,
        resolution=(64, 64),
        vocabulary=vocabulary,
    )


def test_words_the_model_does_not_know_are_named_with_the_vocabulary(caplog):
    card = _card(("a", "red", "circle", "bouncing"))
    with caplog.at_level(logging.WARNING, logger="rf_runtime"):
        assert card.check_prompt("A red circle bouncing") == []
        assert not caplog.records
        assert card.check_prompt("a red fox running through fresh snow") == [
            "fox",
            "running",
            "through",
            "fresh",
            "snow",
        ]
    (record,) = caplog.records
    assert "fox, running, through, fresh, snow" in record.getMessage()
    assert "a red circle bouncing" in record.getMessage()  # what it knows
    assert _card(None).check_prompt("anything at all") == []  # e.g. umT5 models: no list


def test_a_bundle_built_with_a_vocabulary_warns_when_a_stream_opens(tmp_path, tiny_model_dir, caplog):
    pytest.importorskip("onnxruntime")
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.streamer import Streamer
    from rf_runtime.world.procedural import VOCABULARY

    bundle = build_bundle(
        tiny_model_dir,
        tmp_path / "b",
        model_card={"training_stage": "random", "vocabulary": list(VOCABULARY)},
    )
    streamer = Streamer.from_engine(bundle)
    assert streamer.backend.model_card.vocabulary == VOCABULARY
    with caplog.at_level(logging.WARNING, logger="rf_runtime"):
        streamer.open("a red fox running through fresh snow", num_frames=3)
    assert any("fox" in r.getMessage() and "triangle" in r.getMessage() for r in caplog.records)
