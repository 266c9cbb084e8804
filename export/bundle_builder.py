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


def build_bundle(model_dir, out_dir, *, checkpoint=None, model_card: dict | None = None) -> str:
    """Export every graph of the model in ``model_dir`` into the bundle directory ``out_dir``.

    The bundle is assembled in a temporary directory beside ``out_dir`` and renamed when complete.
    """
    import torch

    from rf_runtime.torch_backend import TorchBackend, read_model_card

    backend = TorchBackend.from_dir(model_dir, checkpoint)
    card = read_model_card(os.fspath(model_dir))
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
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
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
        files = {name: {"path": f"{name}.onnx"} for name in
                 ("dit_step", "text_kv", "cache_update", "vae_decode_first", "vae_decode")}
        manifest = {
            "files": files,
            "model": {"dit": cfg.to_dict(), "latent_channels": info.latent_channels,
                      "latent_hw": list(info.latent_hw), "grid_hw": list(grid), "vae_stride": list(info.vae_stride),
                      "fps": info.fps, "vae_cache_slots": n_slots, "vae_cache_shapes": slot_shapes,
                      "precision": "fp32"},
            "stream": dataclasses.asdict(settings),
            "text_encoder": text_spec(),
            # basenames only: a bundle is copied between machines, and paths of this one mean nothing there
            "model_card": {**card.get("model_card", {}), "source": os.path.basename(os.path.normpath(os.fspath(model_dir))),
                           "checkpoint": os.path.basename(os.fspath(checkpoint)) if checkpoint else None,
                           **(model_card or {})},
            "producer": {"torch": torch.__version__},
        }
        write_manifest(tmp, manifest)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
