"""Build an ONNX engine bundle (schema 2) from a model directory: the fp32 graphs for onnxruntime,
optional strongly typed fp16 / bf16 variants for TensorRT, and the umT5 text graph with its tokenizer."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from rf_runtime.export.dit_graph import example_inputs, export_cache_update, export_dit_step, export_text_kv
from rf_runtime.export.vae_graph import decoder_shapes, export_vae_decoder
from rf_runtime import model_dir as model_folder
from rf_runtime.bundle import graph_io_from_onnx, write_manifest
from rf_runtime.cache import commit_matrix
from rf_runtime.errors import ConfigError
from rf_runtime.files import give_default_permissions, output_dir, replace_dir
from rf_runtime.graph_io import BATCHED_GRAPHS, CACHE_UPDATE, DIT_STEP, GRAPHS, VAE_DECODE, VAE_DECODE_FIRST
from rf_runtime.graph_io import batched

OPSET = 17
logger = logging.getLogger("rf_runtime")
BATCHED_WEIGHTS = "batched_weights"  # the file key of the batched graphs' shared weights


def build_bundle(
    model_dir,
    out_dir,
    *,
    checkpoint=None,
    model_card: dict | None = None,
    precisions=("fp32",),
    batch_sizes=(1,),
    force: bool = False,
) -> str:
    """Export every graph of the model in ``model_dir`` into the bundle directory ``out_dir``.

    model_card: overrides of the manifest's model card (``name``, ``training_stage``,
        ``longest_tested_frames``); by default they come from the model directory's
        ``rf_runtime.json`` ("model_card" entry).
    precisions: "fp32" always; "fp16" / "bf16" add strongly typed ``<name>@<precision>``
        variants of every graph (export/precision.py).
    batch_sizes: the numbers of streams one call of the per-chunk graphs serves (1 always; e.g. 1, 2, 4
        adds ``dit_step_b2`` ... ``vae_decode_b4`` and the manifest's ``batch`` section; the graphs of
        every size are fp32, for onnxruntime).
    The bundle is assembled in a temporary directory beside ``out_dir`` and renamed when complete.
    force: replace an existing bundle at ``out_dir``; without it, and for anything at ``out_dir`` that
        is not a bundle, the export is refused before any work (``files.output_dir``).
    """
    from rf_runtime.bundle import MANIFEST

    sizes = check_batch_sizes(batch_sizes)
    out_dir = output_dir(out_dir, "an engine bundle", marker=MANIFEST, force=force)
    from rf_runtime.export.heap import unpooled_large_tensors

    with unpooled_large_tensors():  # freed activations go back to the system (export/heap.py)
        return _export_bundle(model_dir, out_dir, checkpoint, model_card, precisions, sizes)


def _export_bundle(model_dir, out_dir, checkpoint, model_card, precisions, sizes) -> str:
    import onnx
    import torch

    import rf_runtime
    from rf_runtime.bundle import TRAINING_STAGES
    from rf_runtime.backends.base import ModelInfo
    from rf_runtime.text.umt5 import UMT5TextEncoder

    models = model_folder.load(model_dir, checkpoint)
    card = {**models.card.get("model_card", {}), **(model_card or {})}
    if card.get("training_stage") not in TRAINING_STAGES:
        raise ConfigError(
            f"the model card needs a training_stage, one of {list(TRAINING_STAGES)} (got "
            f"{card.get('training_stage')!r}): put it in {os.fspath(model_dir)}/rf_runtime.json under "
            "'model_card', or pass --training-stage"
        )
    text_spec = getattr(models.text_encoder, "to_dict", None)
    if text_spec is None and not isinstance(models.text_encoder, UMT5TextEncoder):
        raise ConfigError(
            f"the text encoder {type(models.text_encoder).__name__} cannot be bundled: bundles take "
            "Wan's umT5 encoder or the hashed encoder (rf_runtime.json text_encoder kind 'umt5' or 'hashed')"
        )
    dit, vae = models.dit.eval(), models.vae.eval()
    latent_hw = model_folder.latent_hw_for(
        *models.resolution, vae.config.stride[1], dit.config.patch_size[1:]
    )
    info = ModelInfo(
        latent_channels=dit.config.in_dim,
        latent_hw=latent_hw,
        vae_stride=vae.config.stride,
        settings=models.settings,
    )
    cfg, settings = dit.config, info.settings
    grid = dit.grid(info.latent_hw)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    try:
        give_default_permissions(tmp, directory=True)  # not mkdtemp's owner-only 0700
        started = time.perf_counter()
        export_text_kv(dit, os.path.join(tmp, "text_kv.onnx"))
        _took("text_kv", started)
        files = {name: {"path": f"{name}.onnx"} for name in GRAPHS}
        # the per-chunk graphs once per batch size, static shapes each; the DiT's first, so that its
        # weights are gone before the other graphs' traces (at 480x832 the VAE's holds 10 GB)
        for size in sizes:
            data = export_step_graph(dit, info, tmp, batched(DIT_STEP, size), size)
            files[batched(DIT_STEP, size)] = {"path": f"{batched(DIT_STEP, size)}.onnx"}
            files.update({f"{batched(DIT_STEP, size)}_data": {"path": d} for d in data})  # > 2 GB
        dit.to("meta")  # its weights are in its graphs now; the lowering needs its module structure only
        for size in sizes:
            names = {g: batched(g, size) for g in BATCHED_GRAPHS if g != DIT_STEP}
            n_slots = export_chunk_graphs(dit, vae, info, tmp, names, size)
            files.update({name: {"path": f"{name}.onnx"} for name in names.values()})
        slot_shapes = decoder_shapes(vae, info.latent_hw)[2]  # on the meta device: no memory
        batched_graphs = [batched(g, b) for b in sizes if b > 1 for g in BATCHED_GRAPHS]
        if batched_graphs:  # their weights once, in one file (export/shared_weights.py)
            from rf_runtime.export.shared_weights import share_weights

            share_weights(tmp, [f"{g}.onnx" for g in batched_graphs], f"{BATCHED_WEIGHTS}.data")
            files[BATCHED_WEIGHTS] = {"path": f"{BATCHED_WEIGHTS}.data"}
        # strongly typed low-precision variants (export/precision.py)
        from rf_runtime.export.precision import add_precision_variants

        files.update(add_precision_variants(tmp, dit, vae, precisions))
        # the umT5 text encoder graph (external data) and its tokenizer (export/text_graph.py)
        if text_spec is None:
            from rf_runtime.export.text_graph import export_text_encoder

            text = export_text_encoder(models.text_encoder, tmp)
            files.update(text["files"])
            text_section = text["spec"]
        else:
            text_section = text_spec()
        source = os.path.basename(os.path.normpath(os.fspath(model_dir)))
        graphs = graph_entries(tmp, files)
        for g in batched_graphs:
            graphs[g]["external_data"] = [BATCHED_WEIGHTS]
        manifest = {
            "files": files,
            "graphs": graphs,
            "model": {
                "dit": cfg.to_dict(),
                "latent_channels": info.latent_channels,
                "latent_hw": list(info.latent_hw),
                "grid_hw": list(grid),
                "vae_stride": list(info.vae_stride),
                "fps": info.fps,
                "vae_cache_slots": n_slots,
                "vae_cache_shapes": slot_shapes,
                "precision": "fp32",
            },
            "stream": dataclasses.asdict(settings),
            "text_encoder": text_section,
            "model_card": {
                "name": card.get("name", source),
                "source": source,
                "checkpoint": os.path.basename(os.fspath(checkpoint)) if checkpoint else None,
                "training_stage": card["training_stage"],
                "chunk_frames": settings.chunk_frames,
                "sink_frames": settings.sink_frames,
                "window_frames": settings.window_frames,
                "resolution": list(info.frame_hw),
                "longest_tested_frames": card.get("longest_tested_frames"),
                **{k: card[k] for k in ("note", "vocabulary") if k in card},
            },
            **(
                {
                    "batch": {
                        "sizes": list(sizes),
                        "graphs": {
                            str(b): {g: batched(g, b) for g in BATCHED_GRAPHS} for b in sizes if b > 1
                        },
                    }
                }
                if sizes != (1,)
                else {}
            ),
            "producer": {
                "rf_runtime": rf_runtime.__version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "opset": OPSET,
            },
        }
        write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _took(what: str, started: float) -> float:
    now = time.perf_counter()
    logger.info("exported %s in %.1f s", what, now - started)
    return now


def check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    """Batch sizes as a sorted tuple that holds 1; anything else is refused before any work."""
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, e.g. 1,2,4; got {list(sizes)}")
    return tuple(sorted({1, *sizes}))


def export_step_graph(dit, info, out: str, name: str, batch: int) -> list[str]:
    """The DiT step graph for ``batch`` rows, written as ``<name>.onnx`` into ``out``; returns its
    external-data files (``export_dit_step``)."""
    import torch

    spec = info.settings.cache_spec
    started = time.perf_counter()
    feeds = example_inputs(
        dit, info.latent_hw, spec.context_frames, spec.chunk_frames, spec.context_frames, batch=batch
    )
    kv_shape = feeds["ctx_k"].shape
    # the context K/V of the full cache (3.5 GB at the 1.3B model's 480x832) only give the trace its
    # shapes: a zero broadcast to that shape costs nothing (the graph has no data-dependent branch)
    for key in ("ctx_k", "ctx_v"):
        feeds[key] = torch.zeros((1,) * len(kv_shape)).expand(kv_shape)
    data = export_dit_step(dit, os.path.join(out, f"{name}.onnx"), feeds)
    _took(name, started)
    return data


def export_chunk_graphs(dit, vae, info, out: str, names: dict, batch: int) -> int:
    """The per-chunk graphs without weights of the DiT (cache update, both VAE graphs) for ``batch``
    rows, written as ``<names[graph]>.onnx`` into ``out``; ``dit`` may be on the meta device (only
    its config is read). Returns the number of VAE cache slots."""
    spec = info.settings.cache_spec
    cfg = dit.config
    grid = dit.grid(info.latent_hw)
    tpf = grid[0] * grid[1]
    started = time.perf_counter()
    kv_shape = (cfg.num_layers, batch, spec.context_frames * tpf, cfg.num_heads, cfg.head_dim)
    kv = np.zeros(kv_shape, np.float32)
    new = np.zeros((*kv_shape[:2], spec.chunk_frames * tpf, *kv_shape[3:]), np.float32)
    mix = commit_matrix(spec, 0).astype(np.float32)
    export_cache_update(
        tpf,
        os.path.join(out, f"{names[CACHE_UPDATE]}.onnx"),
        {
            "ctx_k": kv,
            "ctx_v": kv,
            "new_k": new,
            "new_v": new,
            "mix": mix if batch == 1 else np.repeat(mix[None], batch, axis=0),
        },
    )
    del kv, new
    started = _took(names[CACHE_UPDATE], started)
    slots = export_vae_decoder(
        vae,
        info.latent_hw,
        os.path.join(out, f"{names[VAE_DECODE_FIRST]}.onnx"),
        os.path.join(out, f"{names[VAE_DECODE]}.onnx"),
        batch=batch,
    )
    _took(f"{names[VAE_DECODE_FIRST]}, {names[VAE_DECODE]}", started)
    return slots


def graph_entries(bundle_dir: str, files: dict) -> dict:
    """The manifest ``graphs`` section for every .onnx in ``files``: the graph is named by its file
    key (``dit_step``, ``dit_step@fp16``, ``text_encoder``), its precision is the ``@`` suffix (fp32
    without one), its IO is read from the file, and its weights file, when it has one, is the file
    key ``<graph>_data`` (export/onnx_files.py writes at most one per graph)."""
    graphs = {}
    for key, entry in files.items():
        if not entry["path"].endswith(".onnx"):
            continue
        graph = {
            "file": key,
            "precision": key.partition("@")[2] or "fp32",
            **graph_io_from_onnx(os.path.join(bundle_dir, entry["path"])),
        }
        if f"{key}_data" in files:
            graph["external_data"] = [f"{key}_data"]
        graphs[key] = graph
    return graphs
