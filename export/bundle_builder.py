"""Build an fp32 ONNX engine bundle (for onnxruntime on CPU) from a model directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np

from export.dit_graph import example_inputs, export_cache_update, export_dit_step, export_text_kv
from export.vae_graph import export_vae_decoder, initial_cache
from rf_runtime.bundle import write_manifest
from rf_runtime.cache import commit_matrix
from rf_runtime.errors import ConfigError


GRAPHS = ("dit_step", "text_kv", "cache_update", "vae_decode_first", "vae_decode")
OPSET = 17


def build_bundle(model_dir, out_dir, *, checkpoint=None, model_card: dict | None = None) -> str:
    """Export every graph of the model in ``model_dir`` into the bundle directory ``out_dir``.

    model_card: overrides of the manifest's model card (``name``, ``training_stage``,
        ``longest_tested_frames``); by default they come from the model directory's
        ``rf_runtime.json`` ("model_card" entry).
    The bundle is assembled in a temporary directory beside ``out_dir`` and renamed when complete.
    """
    import onnx
    import torch

    import rf_runtime
    from rf_runtime.bundle import TRAINING_STAGES, graph_io_from_onnx
    from rf_runtime.torch_backend import TorchBackend, read_model_card

    backend = TorchBackend.from_dir(model_dir, checkpoint)
    card = {**read_model_card(os.fspath(model_dir)).get("model_card", {}), **(model_card or {})}
    if card.get("training_stage") not in TRAINING_STAGES:
        raise ConfigError(f"the model card needs a training_stage, one of {list(TRAINING_STAGES)} (got "
                          f"{card.get('training_stage')!r}): put it in {os.fspath(model_dir)}/rf_runtime.json under "
                          "'model_card', or pass --training-stage")
    text_spec = getattr(backend.text_encoder, "to_dict", None)
    if text_spec is None:
        raise ConfigError("only models with the hashed text encoder can be bundled yet: the umT5 graph export "
                          "is not written")
    dit, vae, info = backend.dit, backend.vae, backend.info
    cfg, settings = dit.config, info.settings
    spec = settings.cache_spec
    grid = dit.grid(info.latent_hw)
    tpf = grid[0] * grid[1]
    out_dir = os.path.abspath(os.fspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=".rf-bundle-", dir=os.path.dirname(out_dir))
    try:
        feeds = example_inputs(dit, info.latent_hw, spec.context_frames, spec.chunk_frames, spec.context_frames)
        export_dit_step(dit, os.path.join(tmp, "dit_step.onnx"), feeds)
        export_text_kv(dit, os.path.join(tmp, "text_kv.onnx"))
        kv = feeds["ctx_k"]
        new = np.zeros((*kv.shape[:2], spec.chunk_frames * tpf, *kv.shape[3:]), np.float32)
        export_cache_update(tpf, os.path.join(tmp, "cache_update.onnx"), {
            "ctx_k": kv, "ctx_v": kv, "new_k": new, "new_v": new, "mix": commit_matrix(spec, 0).astype(np.float32)})
        n_slots = export_vae_decoder(vae, info.latent_hw, os.path.join(tmp, "vae_decode_first.onnx"),
                                     os.path.join(tmp, "vae_decode.onnx"))
        slot_shapes = [list(s.shape) for s in initial_cache(vae, info.latent_hw)]
        files = {name: {"path": f"{name}.onnx"} for name in GRAPHS}
        graphs = {name: {"file": name, "precision": "fp32", **graph_io_from_onnx(os.path.join(tmp, f"{name}.onnx"))}
                  for name in GRAPHS}
        source = os.path.basename(os.path.normpath(os.fspath(model_dir)))
        manifest = {
            "files": files,
            "graphs": graphs,
            "model": {"dit": cfg.to_dict(), "latent_channels": info.latent_channels,
                      "latent_hw": list(info.latent_hw), "grid_hw": list(grid), "vae_stride": list(info.vae_stride),
                      "fps": info.fps, "vae_cache_slots": n_slots, "vae_cache_shapes": slot_shapes,
                      "precision": "fp32"},
            "stream": dataclasses.asdict(settings),
            "text_encoder": text_spec(),
            "model_card": {
                "name": card.get("name", source), "source": source,
                "checkpoint": os.path.basename(os.fspath(checkpoint)) if checkpoint else None,
                "training_stage": card["training_stage"],
                "chunk_frames": settings.chunk_frames, "sink_frames": settings.sink_frames,
                "window_frames": settings.window_frames, "resolution": list(info.frame_hw),
                "longest_tested_frames": card.get("longest_tested_frames")},
            "producer": {"rf_runtime": rf_runtime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "opset": OPSET},
        }
        write_manifest(tmp, manifest)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
