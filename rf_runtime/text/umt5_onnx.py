"""The umT5 text encoder of an engine bundle, without torch: ``tokenizers`` + onnxruntime.

Same result as ``rf_runtime.text.umt5.UMT5TextEncoder.encode``: Wan's prompt cleaning
(``clean_prompts``), the umT5 tokenizer with EOS appended, truncation and padding to ``text_len``
(512 for Wan2.1), then the encoder graph written by ``export/text_graph.py``, whose output is zero
at the padding positions. Output: ``[B, text_len, text_dim]`` float32 (SPEC section 5).

The graph runs through a ``rf_runtime.runners.Runner``: an ``OnnxRuntimeRunner`` by default, or
whatever runner the engine backend made for the bundle's ``text_encoder`` graph (a TensorRT plan).
"""

from __future__ import annotations

import os

import numpy as np

from rf_runtime.errors import ConfigError, require
from rf_runtime.text.umt5 import clean_prompts  # stdlib only: no torch, no transformers
from rf_runtime.runners import OnnxRuntimeRunner, Runner


class OnnxTextEncoder:
    """Prompts -> umT5 embeddings through the exported graph; ``text_len`` tokens per prompt.

    graph: the .onnx path (run by an ``OnnxRuntimeRunner`` on ``device``) or a ``Runner`` of that
        graph (activated here if it is not yet).
    """

    def __init__(self, graph, tokenizer_dir: str, text_len: int, device: str = "cpu"):
        tokenizers = require("tokenizers", "cpu")
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{path} is missing: the bundle's umT5 tokenizer is incomplete; rebuild the bundle with "
                "`rf-export onnx --model-dir MODEL_DIR --out BUNDLE`"
            )
        self.tokenizer = tokenizers.Tokenizer.from_file(path)
        pad_id = self.tokenizer.token_to_id("<pad>")
        if pad_id is None or self.tokenizer.token_to_id("</s>") is None:
            raise ConfigError(f"{path} defines no <pad> or </s> token: it is not the umT5 tokenizer")
        self.tokenizer.enable_truncation(max_length=text_len)  # the post-processor's EOS is kept
        self.tokenizer.enable_padding(length=text_len, pad_id=pad_id, pad_token="<pad>")
        self.runner = (
            graph
            if isinstance(graph, Runner)
            else OnnxRuntimeRunner(graph, device=device, name="text_encoder")
        )
        if not self.runner.is_active:
            self.runner.activate()
        spec = self.runner.graph
        self.text_len, self.text_dim = int(text_len), int(spec.outputs[0].shape[-1])
        if list(spec.inputs[0].shape) != [1, self.text_len]:
            raise ConfigError(
                f"the text encoder graph takes {list(spec.inputs[0].shape)} tokens but the manifest says "
                f"text_len={text_len}: rebuild the bundle"
            )

    def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (ids, mask), both [B, text_len] int64, as the torch encoder's ``tokenize``."""
        cleaned = clean_prompts(prompts)
        encodings = self.tokenizer.encode_batch(cleaned)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        return ids, mask

    def encode(self, prompts) -> np.ndarray:
        """Prompts -> [B, text_len, text_dim] float32, padding positions 0.0."""
        ids, mask = self.tokenize(prompts)
        out = [
            self.runner.infer({"input_ids": ids[b : b + 1], "attention_mask": mask[b : b + 1]})[
                "text_embeds"
            ].copy()
            for b in range(len(ids))
        ]  # copied: infer's outputs are overwritten by the next call
        return np.concatenate(out).astype(np.float32, copy=False)
