"""Text encoders: prompts -> text embeddings [B, text_len, text_dim] float32, padding positions zero.

- ``hashed``: ``HashedTextEncoder``, weight-free and numpy-only (small models trained here, tests);
- ``umt5``: ``UMT5TextEncoder``, Wan2.1's umT5-XXL on ``transformers`` (torch), and Wan's prompt cleaning;
- ``umt5_onnx``: ``OnnxTextEncoder``, the same umT5 from an engine bundle's graph and tokenizer (no torch).

``text_encoder_from_spec`` is the one place that turns a ``text_encoder`` entry (of a model
folder's ``rf_runtime.json`` or a bundle's manifest) into an encoder. Importing this package
imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import os

from rf_runtime.errors import ConfigError

KINDS = ("hashed", "umt5")


def text_encoder_from_spec(
    spec: dict | None,
    where: str,
    *,
    model_dir: str | os.PathLike | None = None,
    bundle_dir: str | os.PathLike | None = None,
    runner=None,
    **umt5_options,
):
    """The encoder a ``text_encoder`` entry names.

    spec: ``{"kind": "hashed", "text_dim", "text_len", "seed"}`` or ``{"kind": "umt5", ...}``; a model
        folder without the entry means umT5 (Wan's layout).
    where: the file the entry comes from, for error messages.
    model_dir: umT5 weights and tokenizer are read from this model folder (torch + transformers);
        ``umt5_options`` go to ``UMT5TextEncoder.from_pretrained`` (device, dtype, ...).
    bundle_dir, runner: umT5 from an engine bundle: the tokenizer directory the spec names, and the
        runner of the bundle's ``text_encoder`` graph (no torch).
    """
    spec = dict(spec or {})
    kind = spec.pop("kind", "umt5" if model_dir is not None else None)
    if kind == "hashed":
        from rf_runtime.text.hashed import HashedTextEncoder

        return HashedTextEncoder(**spec)
    if kind == "umt5" and bundle_dir is not None:
        from rf_runtime.text.umt5_onnx import OnnxTextEncoder

        return OnnxTextEncoder(
            runner, os.path.join(os.fspath(bundle_dir), spec["tokenizer"]), spec["text_len"]
        )
    if kind == "umt5" and model_dir is not None:
        from rf_runtime.text.umt5 import load_text_encoder

        return load_text_encoder(model_dir, **umt5_options)
    fix = (
        "rebuild the bundle with `rf-export onnx`"
        if bundle_dir is not None
        else "set text_encoder.kind to 'umt5' or 'hashed'"
    )
    raise ConfigError(
        f"{where}: text encoder kind {kind!r} is not supported; the kinds are {list(KINDS)}: {fix}"
    )
