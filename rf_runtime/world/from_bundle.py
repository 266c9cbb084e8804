"""Weights back out of an exported ONNX bundle: the DiT and the VAE decoder, to continue training from them.

A bundle holds the generator (``dit_step`` + ``text_kv``) and the VAE decoder (``vae_decode``) but not
the VAE encoder nor the teacher. When the training files behind a shipped bundle are gone, these give
the next training run a start: ``dit_from_bundle`` for the teacher's initialisation, and
``vae_from_bundle`` for a VAE whose decoder (and latent normalisation) is the bundle's, with a fresh
encoder that ``train_vae(..., encoder_only=True)`` fits to it.

Parameters the exporter kept under their names are taken by name; the weights of matrix products
it stored anonymously (``onnx::MatMul_*``, transposed) are found through the name of the node that
uses them (``/blocks.0/cross_attn/q/MatMul`` -> ``blocks.0.cross_attn.q.weight``).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import torch

from rf_runtime.errors import InputError
from rf_runtime.models import CausalDiT
from rf_runtime.models.vae import WanVAE


def _load(bundle: str, name: str):
    import onnx

    path = os.path.join(bundle, f"{name}.onnx")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist: give an exported bundle directory (rf-export onnx)")
    return onnx.load(path)


def _param_name(node_name: str, graph: str) -> str:
    """The module path of a node's scope, e.g. ``/blocks.0/ffn/ffn.0/MatMul`` -> ``blocks.0.ffn.0``."""
    parts = [p for p in node_name.strip("/").split("/")[:-1]]
    if graph == "text_kv" and len(parts) == 1 and re.fullmatch(r"[kv](_\d+)?", parts[0]):
        kind, _, idx = parts[0].partition("_")
        return f"blocks.{idx or 0}.cross_attn.{kind}"
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p  # "ffn", "ffn.0" -> "ffn.0"
        else:
            path.append(p)
    if len(path) == 2 and path[0].startswith("blocks.") and path[1] in ("q", "k", "v", "o"):
        path.insert(1, "self_attn")
    return ".".join(path)


def dit_state_from_bundle(bundle: str) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    state: dict[str, torch.Tensor] = {}
    for graph in ("dit_step", "text_kv"):
        model = _load(bundle, graph)
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for name, value in inits.items():
            if name.startswith("model."):
                state[name[len("model.") :]] = torch.from_numpy(value.copy())
        for node in model.graph.node:
            for x in node.input:
                if not x.startswith("onnx::") or x not in inits:
                    continue
                base = _param_name(node.name, graph)
                if node.op_type == "MatMul":
                    state[base + ".weight"] = torch.from_numpy(np.ascontiguousarray(inits[x].T))
                elif node.op_type == "Add":
                    state[base + ".modulation"] = torch.from_numpy(
                        inits[x].reshape(1, *inits[x].shape[-2:]).copy()
                    )
    return state


def dit_from_bundle(bundle: str, config) -> CausalDiT:
    """The bundle's generator as a ``CausalDiT`` of ``config`` (strict: every parameter must be found)."""
    return CausalDiT.from_state_dict(dit_state_from_bundle(bundle), config)


def _normalisation(model, z_dim: int, bundle: str):
    """(1 / latents_std, latents_mean) from the decoder's first ops: z / inv_std + mean."""
    from onnx import numpy_helper

    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant"
    }
    consts.update({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
    z = model.graph.input[0].name
    div = next(
        (n for n in model.graph.node if n.op_type == "Div" and n.input[0] == z and n.input[1] in consts), None
    )
    add = div and next((n for n in model.graph.node if n.op_type == "Add" and div.output[0] in n.input), None)
    other = add and next((x for x in add.input if x != div.output[0]), None)
    if (
        add is None
        or other not in consts
        or consts[div.input[1]].size != z_dim
        or consts[other].size != z_dim
    ):
        raise InputError(
            f"{bundle}: vae_decode does not start with the latent normalisation of {z_dim} channels"
        )
    return consts[div.input[1]].ravel(), consts[other].ravel()


def vae_from_bundle(bundle: str, config, seed: int = 0) -> WanVAE:
    """A ``WanVAE`` of ``config`` with the bundle's decoder, ``conv2`` and latent normalisation; the
    encoder is freshly initialised (seeded)."""
    from onnx import numpy_helper

    model = _load(bundle, "vae_decode")
    inv_std, mean = _normalisation(model, config.z_dim, bundle)
    cfg = dataclasses.replace(
        config, latents_mean=tuple(float(v) for v in mean), latents_std=tuple(float(1.0 / v) for v in inv_std)
    )
    torch.manual_seed(seed)
    vae = WanVAE(cfg)
    own = vae.state_dict()
    found = {}
    if any(i.name.startswith("onnx::") for i in model.graph.initializer):
        raise InputError(
            f"{bundle}: its vae_decode stores convolution weights without names (the 2-D convolution "
            "export), which vae_from_bundle cannot map back; take the VAE from the model directory the "
            "bundle was exported from (only bundles of the earlier exporter, such as the "
            "procedural-world-64 of issue 5, are readable)"
        )
    for init in model.graph.initializer:
        key = init.name[len("vae.") :] if init.name.startswith("vae.") else None
        if key is None or key not in own:
            raise InputError(
                f"{bundle}: vae_decode holds {init.name!r}, which the VAE config has no place for"
            )
        found[key] = torch.from_numpy(numpy_helper.to_array(init).copy())
    missing = [k for k in own if k.startswith(("decoder.", "conv2.")) and k not in found]
    if missing:
        raise InputError(f"{bundle}: vae_decode lacks {missing[:3]}: not a bundle of this VAE config")
    vae.load_state_dict({**own, **found})
    return vae
