"""Lowering the umT5 text encoder to ONNX (external data) plus its tokenizer files, for the bundle.

The graph takes ``input_ids`` and ``attention_mask`` ([1, text_len] int64, text_len = 512 for
Wan2.1) and returns ``text_embeds`` [1, text_len, d_model] float32 with the padding positions set
to 0.0, as ``rf_runtime.text.umt5.UMT5TextEncoder.encode`` does. Tokenizing and Wan's
prompt cleaning run on the host (``rf_runtime.text.umt5_onnx``), from the tokenizer files written next
to the graph.

umT5-XXL's encoder is far beyond protobuf's 2 GB limit, so its weights always go to one
external-data file beside the graph (``text_encoder.onnx.data``; every tensor of 1 KiB or more),
whatever the model size: the bundle has the same layout for the tiny test model and the real one.
Small tensors (shapes, axes, scalars) stay in the graph, where runtimes read them while loading. Export needs about twice
the model's fp32 size in memory (the torch model and the ONNX tensors).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.nn as nn

from rf_runtime import graph_io

GRAPH_FILE = "text_encoder.onnx"
DATA_FILE = GRAPH_FILE + ".data"  # written by rf_runtime.export.onnx_files.save_onnx
TOKENIZER_DIR = "tokenizer"
INPUTS = list(graph_io.TEXT_ENCODER_INPUTS)
OUTPUTS = list(graph_io.TEXT_ENCODER_OUTPUTS)


class TextEncoderGraph(nn.Module):
    """``UMT5EncoderModel`` -> last hidden state, padding positions zeroed (Wan's WanTextEncoder)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        # the tokenizer pads on the right, so "position < number of tokens" is the mask itself
        return out * attention_mask.unsqueeze(-1).to(out.dtype)


def export_text_encoder(encoder, out_dir: str, opset: int = 17) -> dict:
    """Write ``text_encoder.onnx`` + ``text_encoder.onnx.data`` and ``tokenizer/`` into ``out_dir``.

    ``encoder`` is a ``UMT5TextEncoder`` (float32 weights). Returns the bundle ``files`` entries
    (keys ``text_encoder``, ``text_encoder_data``, ``tokenizer/<file>``) and the
    ``text_encoder`` manifest section under the key ``"spec"``.
    """
    import onnx

    from rf_runtime.export.onnx_files import save_onnx
    from rf_runtime.export.onnx_fold import fold_constants

    model = encoder.model.float().eval()
    length = encoder.text_len
    ids = torch.zeros(1, length, dtype=torch.long)
    mask = torch.zeros(1, length, dtype=torch.long)
    ids[0, 0], mask[0, 0] = int(encoder.tokenizer.eos_token_id), 1
    scratch = tempfile.mkdtemp(prefix=".rf-text-", dir=out_dir)
    try:
        # torch writes a > 2 GB model as one file per tensor; gather them into one data file
        raw = os.path.join(scratch, GRAPH_FILE)
        with torch.no_grad():
            # no constant folding: it would store each layer's relative position bias as a
            # [heads, text_len, text_len] constant (1.6 GB more for umT5-XXL); the bucket arithmetic
            # stays in the graph and every runtime folds it when it loads the graph
            torch.onnx.export(
                TextEncoderGraph(model),
                (ids, mask),
                raw,
                input_names=INPUTS,
                output_names=OUTPUTS,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=False,
            )
        # scalar arithmetic (the attention scale, in float64) and shape computations become constants
        graph = fold_constants(onnx.load(raw))  # onnx.load reads any external tensors too
        data = save_onnx(graph, os.path.join(out_dir, GRAPH_FILE), external=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    encoder.tokenizer.save_pretrained(tok_dir)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise RuntimeError(f"the tokenizer saved to {tok_dir} has no tokenizer.json (not a fast tokenizer)")
    files = {"text_encoder": {"path": GRAPH_FILE}, "text_encoder_data": {"path": data[0]}}
    for name in sorted(os.listdir(tok_dir)):
        files[f"{TOKENIZER_DIR}/{name}"] = {"path": f"{TOKENIZER_DIR}/{name}"}
    spec = {
        "kind": "umt5",
        "graph": "text_encoder",
        "tokenizer": TOKENIZER_DIR,
        "text_len": length,
        "text_dim": encoder.text_dim,
    }
    return {"files": files, "spec": spec}
