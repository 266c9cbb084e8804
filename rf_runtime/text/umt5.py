"""Text encoders: turn prompts into the text embeddings the DiT cross-attends to.

``TextEncoder`` is the small interface the streamer uses; ``UMT5TextEncoder`` is the umT5-XXL
encoder of Wan2.1 (SPEC section 5) on top of ``transformers.UMT5EncoderModel``.

Semantics follow Wan2.1 / Reward Forcing (``WanTextEncoder``):

* each prompt is cleaned like Wan's ``HuggingfaceTokenizer(clean="whitespace")``: ``ftfy.fix_text``,
  ``html.unescape`` twice, strip, runs of Unicode whitespace collapsed to one space, strip
  (see ``clean_prompt``; ftfy is optional: without it a built-in equivalent is used, identical on
  well-formed text, which only lacks ftfy's repair of mis-decoded text such as "Ã©");
* the umT5 tokenizer appends EOS, truncates to ``text_len`` (512) tokens and pads to ``text_len``
  with an attention mask;
* the encoder output at the padding positions is set to exactly 0.0.

Two on-disk forms load from local paths (never from a model hub):

* Wan's layout: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own ``T5Encoder`` key names) with the
  tokenizer in ``google/umt5-xxl/`` next to it; ``wan_to_hf_state_dict`` maps the keys;
* a Hugging Face directory: ``config.json`` of a umT5 / T5 / mT5 model, ``model.safetensors``
  (or ``pytorch_model.bin``, or sharded with an ``.index.json``) and the tokenizer files
  (``tokenizer.json`` or ``spiece.model``), or the diffusers layout with ``text_encoder/`` and
  ``tokenizer/`` subdirectories. Decoder and LM-head weights of a full seq2seq checkpoint are
  ignored; every encoder weight must be present.

Loading is strict: a checkpoint whose keys or shapes do not match raises ``CheckpointError``.
"""

from __future__ import annotations

import html
import html.entities
import json
import os
import re
import unicodedata
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from rf_runtime.errors import CheckpointError, ConfigError, InputError, MissingDependencyError, require
from rf_runtime.schema import as_int

if TYPE_CHECKING:  # torch and transformers are optional at import time
    import torch

__all__ = [
    "TextEncoder",
    "UMT5TextEncoder",
    "load_text_encoder",
    "clean_prompt",
    "clean_prompts",
    "wan_to_hf_state_dict",
    "WAN_T5_FILE",
    "WAN_TOKENIZER_DIR",
]

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = os.path.join("google", "umt5-xxl")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
EXPECTED_FILES = (
    f"either Wan's layout ({WAN_T5_FILE} + tokenizer directory {WAN_TOKENIZER_DIR}/), "
    f"or a Hugging Face umT5 encoder directory (config.json + {' or '.join(HF_WEIGHT_FILES)} "
    f"+ {' or '.join(TOKENIZER_FILES)}), or the diffusers layout (text_encoder/ + tokenizer/)"
)

_ENCODERS = {  # config.json model_type -> (config class, encoder class) in transformers
    "umt5": ("UMT5Config", "UMT5EncoderModel"),
    "t5": ("T5Config", "T5EncoderModel"),
    "mt5": ("MT5Config", "MT5EncoderModel"),
}


class TextEncoder(ABC):
    """Prompts -> text embeddings ``[B, text_len, text_dim]`` float32, padding positions zero."""

    text_len: int
    text_dim: int

    @abstractmethod
    def encode(self, prompts: list[str]) -> "torch.Tensor":
        """Encode a batch of prompts into ``[B, text_len, text_dim]`` float32 embeddings."""


# ---- prompt cleaning ---------------------------------------------------------------------------

# What the ``regex`` module's ``\s`` matches (Unicode White_Space); Python's ``re`` ``\s`` would
# also match U+001C..U+001F, which Wan's cleaning keeps (ftfy removes them first anyway).
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

# The deterministic ftfy fixes, for when ftfy is not installed (``_fix_text_lite``).
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_ANSI_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LIGATURES = str.maketrans(
    {
        "Ĳ": "IJ",
        "ĳ": "ij",
        "ŉ": "ʼn",
        "Ǳ": "DZ",
        "ǲ": "Dz",
        "ǳ": "dz",
        "Ǆ": "DŽ",
        "ǅ": "Dž",
        "ǆ": "dž",
        "Ǉ": "LJ",
        "ǈ": "Lj",
        "ǉ": "lj",
        "Ǌ": "NJ",
        "ǋ": "Nj",
        "ǌ": "nj",
        "ﬀ": "ff",
        "ﬁ": "fi",
        "ﬂ": "fl",
        "ﬃ": "ffi",
        "ﬄ": "ffl",
        "ﬅ": "ſt",
        "ﬆ": "st",
    }
)
_WIDTH = {0x3000: " "}
_WIDTH.update(
    {
        i: unicodedata.normalize("NFKC", chr(i))
        for i in range(0xFF01, 0xFFF0)
        if unicodedata.normalize("NFKC", chr(i)) != chr(i)
    }
)
# C1 controls read as Windows-1252 (ftfy's "sloppy" codec keeps the 5 undefined bytes as they are)
_C1 = {i: bytes([i]).decode("cp1252", errors="ignore") or chr(i) for i in range(0x80, 0xA0)}
_CONTROL = dict.fromkeys(
    [
        *range(0x00, 0x09),
        0x0B,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x206A, 0x2070),
        0xFEFF,
        *range(0xFFF9, 0xFFFD),
    ]
)


def _join_surrogates(m: re.Match) -> str:
    hi, lo = (ord(c) for c in m.group(0))
    return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))


_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


def _entities() -> dict[str, str]:
    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                out["&" + name.upper()] = char.upper()  # ftfy also decodes all-caps names ("&NTILDE;")
    return out


_ENTITIES: dict[str, str] = {}


def _unescape_entity(m: re.Match) -> str:
    text = m.group(0)
    if not _ENTITIES:
        _ENTITIES.update(_entities())
    if text in _ENTITIES:
        return _ENTITIES[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out
    return text


def _fix_segment_lite(text: str, unescape: bool) -> str:
    while True:
        orig = text
        if unescape:
            text = _ENTITY.sub(_unescape_entity, text)
        text = text.translate(_C1).translate(_LIGATURES).translate(_WIDTH)
        text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
        text = (
            text.replace("\r\n", "\n")
            .replace("\r", "\n")
            .replace("\u2028", "\n")
            .replace("\u2029", "\n")
            .replace("\u0085", "\n")
        )
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_join_surrogates, text))
        text = _ANSI_ESCAPE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == orig:
            return text


def _fix_text_lite(text: str) -> str:
    """``ftfy.fix_text`` without its mojibake repair.

    Like ftfy it works line by line (a segment ends after each "\\n") and repeats, until nothing
    changes, the fixes ftfy makes to well-formed text: HTML entities (only until a line with
    ``<`` is met), C1 controls read as Windows-1252 (U+0085 becomes "…"), Latin ligatures,
    full/half-width forms, curly quotes, line breaks, surrogates, terminal escapes, control
    characters and NFC. Install ftfy for the exact behaviour on mis-decoded text ("Ã©" for "é").
    """
    out, unescape = [], True
    for segment in re.findall(r"[^\n]*\n|[^\n]+", text):
        unescape = unescape and "<" not in segment
        out.append(_fix_segment_lite(segment, unescape))
    return "".join(out)


def clean_prompt(text: str, *, use_ftfy: bool | None = None) -> str:
    """Clean a prompt the way Wan's ``HuggingfaceTokenizer(clean="whitespace")`` does.

    That is ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, full-width forms, control
    characters, NFC), ``html.unescape`` twice, strip, then every run of Unicode whitespace becomes
    one space, strip. ftfy is optional: when it is not installed (or ``use_ftfy=False``) the
    deterministic part of ``fix_text`` is reproduced here, which is identical for well-formed text;
    only the repair of mis-decoded text ("Ã©") needs ``pip install ftfy``.
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, got {type(text).__name__}")
    fix = None
    if use_ftfy is not False:
        try:
            import ftfy

            fix = ftfy.fix_text
        except ImportError as exc:
            if use_ftfy:
                raise MissingDependencyError(
                    "use_ftfy=True needs ftfy, which is not installed: pip install ftfy "
                    "(or pass use_ftfy=None to fall back to the built-in cleaning)"
                ) from exc
    text = fix(text) if fix is not None else _fix_text_lite(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def clean_prompts(prompts) -> list[str]:
    """A prompt or a non-empty list of prompts -> the cleaned prompts (``clean_prompt``); an empty or
    non-string prompt raises InputError. Shared by the torch and the ONNX umT5 encoders."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} must be a string, got {type(prompt).__name__}")
        text = clean_prompt(prompt)
        if not text:
            raise InputError(f"prompt {i} ({prompt!r}) is empty: describe the video to generate")
        cleaned.append(text)
    return cleaned


# ---- checkpoints ---------------------------------------------------------------------------

_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_WAN_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU-gated branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def wan_to_hf_state_dict(state_dict: dict) -> dict:
    """Rename Wan's ``T5Encoder`` weights (umT5, ``shared_pos=False``) to ``UMT5EncoderModel``'s.

    ``token_embedding`` -> ``shared`` (and the tied ``encoder.embed_tokens``), ``blocks.{i}`` ->
    ``encoder.block.{i}`` (attention ``q, k, v, o``, per-layer relative position bias, ``norm1``,
    ``norm2``, FFN ``gate.0 / fc1 / fc2`` -> ``wi_0 / wi_1 / wo``), ``norm`` ->
    ``encoder.final_layer_norm``. A key it does not know raises ``CheckpointError``.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _WAN_BLOCK.fullmatch(key)) and m.group(2) in _WAN_BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_KEYS[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"unexpected keys in Wan's T5 encoder state dict: {_listing(unknown)}; expected Wan's umT5 "
            "T5Encoder names (token_embedding, blocks.{i}.attn.{q,k,v,o}, blocks.{i}.norm1/norm2, "
            "blocks.{i}.ffn.{gate.0,fc1,fc2}, blocks.{i}.pos_embedding.embedding, norm): pass "
            f"{WAN_T5_FILE} from a Wan2.1 release"
        )
    return out


def _wan_keys(num_layers: int) -> list[str]:
    """The key names of Wan's umT5 ``T5Encoder`` with ``num_layers`` blocks."""
    return ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{i}.{k}" for i in range(num_layers) for k in _WAN_BLOCK_KEYS
    ]


def _umt5_config_from_wan(sd: dict, source: str):
    """A ``UMT5Config`` with the sizes of Wan's T5 encoder weights (umt5-xxl: 4096 / 10240 / 64 / 24)."""
    transformers = require("transformers", "text")
    need = [
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.ffn.fc1.weight",
        "blocks.0.pos_embedding.embedding.weight",
    ]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source}: missing keys {_listing(missing)}: this is not Wan's umT5 encoder "
            f"checkpoint ({WAN_T5_FILE}, T5Encoder with a relative position bias per layer)"
        )
    vocab, dim = sd["token_embedding.weight"].shape
    dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := _WAN_BLOCK.fullmatch(k)))
    if dim_attn % num_heads:
        raise CheckpointError(f"{source}: attention width {dim_attn} is not divisible by {num_heads} heads")
    return transformers.UMT5Config(
        vocab_size=int(vocab),
        d_model=int(dim),
        d_kv=int(dim_attn // num_heads),
        d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _torch_load(path: str) -> dict:
    import torch

    try:
        sd = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a tensor-only PyTorch file: {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return sd


def _read_hf_weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    def load(name: str) -> dict:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: it is named by the checkpoint index in {model_dir}")
        if name.endswith(".safetensors"):
            try:
                return load_file(path)
            except Exception as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return _torch_load(path)

    for name in HF_WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return load(name)
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{path} is not a checkpoint index with a 'weight_map': {exc}") from exc
        sd = {}
        for shard in shards:
            sd.update(load(shard))
        return sd
    raise CheckpointError(f"no weights in {model_dir}: expected one of {', '.join(HF_WEIGHT_FILES)}")


def _build_encoder(model_cls, config, sd: dict, dtype, device, source: str):
    """Create the encoder without initializing weights and load ``sd`` into it strictly."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    # the input embedding is tied to ``shared``; checkpoints may hold either name
    for a, b in (
        ("shared.weight", "encoder.embed_tokens.weight"),
        ("encoder.embed_tokens.weight", "shared.weight"),
    ):
        if a in sd and b not in sd and b in expected:
            sd[b] = sd[a]
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        parts = ([f"missing keys: {_listing(missing)}"] if missing else []) + (
            [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(
            f"{source} does not match a {type(model).__name__} with {config.num_layers} layers "
            f"and d_model={config.d_model}: {'; '.join(parts)}. Check that config.json "
            "describes these weights"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(
            f"{source}: shapes do not match the config (checkpoint vs model): {_listing(bad, 4)}"
        )
    converted: dict[int, Any] = {}  # convert each tensor once, so tied weights stay one tensor
    for k, v in sd.items():
        if id(v) not in converted:
            converted[id(v)] = v.to(dtype)
        sd[k] = converted[id(v)]
    model.load_state_dict(sd, strict=True, assign=True)
    model.set_input_embeddings(model.shared)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"{source}: some weights of {type(model).__name__} were not loaded")
    return model.to(device).eval().requires_grad_(False)


def _load_tokenizer(tokenizer_dir: str):
    transformers = require("transformers", "text")
    if not any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {tokenizer_dir}: expected {' or '.join(TOKENIZER_FILES)} "
            "(the google/umt5-xxl tokenizer files)"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {tokenizer_dir}: {exc}") from exc


def _resolve_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(
        f"dtype must be a torch dtype or its name ('float32', 'bfloat16', 'float16'), got {dtype!r}"
    )


def _has_tokenizer(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)


def _hf_model_type(d: str) -> str | None:
    """The model_type of an HF text encoder in ``d`` (None for anything else, e.g. a DiT config)."""
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path) or not any(os.path.isfile(os.path.join(d, f)) for f in HF_WEIGHT_FILES):
        return None
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in _ENCODERS else None


def _find_layout(path: str) -> tuple[str, str, str]:
    """(kind, weights path, tokenizer dir) with kind 'wan' or 'hf', or a CheckpointError."""
    if os.path.isfile(path) and path.endswith(".pth"):
        tok = os.path.join(os.path.dirname(path), WAN_TOKENIZER_DIR)
        if not os.path.isdir(tok):
            raise CheckpointError(
                f"no tokenizer next to {path}: expected the directory {tok} "
                "(spiece.model / tokenizer.json of google/umt5-xxl)"
            )
        return "wan", path, tok
    if not os.path.isdir(path):
        raise CheckpointError(
            f"text encoder directory {path} does not exist: expected a directory with {EXPECTED_FILES}"
        )
    wan = os.path.join(path, WAN_T5_FILE)
    if os.path.isfile(wan):
        tok = os.path.join(path, WAN_TOKENIZER_DIR)
        if os.path.isdir(tok):
            return "wan", wan, tok
        if _has_tokenizer(path):
            return "wan", wan, path
        raise CheckpointError(
            f"{path} has {WAN_T5_FILE} but no tokenizer: expected the directory {tok} "
            "(spiece.model / tokenizer.json of google/umt5-xxl), as in the Wan2.1 release"
        )
    if _hf_model_type(path):
        return "hf", path, path
    sub, tok = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if _hf_model_type(sub):
        return "hf", sub, tok if os.path.isdir(tok) else sub
    raise CheckpointError(f"no text encoder in {path}: expected {EXPECTED_FILES}")


class UMT5TextEncoder(TextEncoder):
    """The umT5 encoder of Wan2.1 with its tokenizer (text_len 512, text_dim 4096 for umT5-XXL)."""

    def __init__(self, model, tokenizer, text_len: int = 512):
        text_len = as_int(text_len, "text_len", minimum=1, error=ConfigError, hint="512 for Wan2.1")
        n_tokens, vocab = len(tokenizer), model.config.vocab_size
        if n_tokens > vocab:
            raise ConfigError(
                f"the tokenizer has {n_tokens} tokens but the encoder embeds only {vocab}: "
                "pair the encoder with its own tokenizer (google/umt5-xxl for Wan2.1)"
            )
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError(
                "the tokenizer defines no pad or EOS token: use the google/umt5-xxl tokenizer files"
            )
        self.model, self.tokenizer, self.text_len = model, tokenizer, text_len
        self.text_dim = int(model.config.d_model)

    @property
    def device(self):
        return self.model.shared.weight.device

    @property
    def dtype(self):
        return self.model.shared.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        text_len: int = 512,
        device="cpu",
        dtype=None,
        attn_implementation: str = "sdpa",
    ) -> "UMT5TextEncoder":
        """Load from a local directory (Wan's layout, an HF encoder, or diffusers' layout) or a Wan ``.pth``.

        dtype: the weights' dtype (default float32; bfloat16 halves the memory of umT5-XXL, ~11 GB).
        attn_implementation: "sdpa" or "eager" (transformers' attention kernels).
        """
        torch = require("torch", "torch")
        transformers = require("transformers", "text")
        path = os.fspath(path)
        dtype = torch.float32 if dtype is None else _resolve_dtype(dtype)
        if attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        text_len = as_int(text_len, "text_len", minimum=1, error=ConfigError, hint="512 for Wan2.1")
        kind, weights, tok_dir = _find_layout(path)
        if kind == "wan":
            raw = _torch_load(weights)
            config = _umt5_config_from_wan(raw, weights)
            missing = set(_wan_keys(config.num_layers)) - set(raw)
            if missing:
                raise CheckpointError(
                    f"{weights}: missing keys {_listing(missing)} of Wan's {config.num_layers}-layer "
                    f"umT5 encoder: the file is incomplete or not {WAN_T5_FILE}"
                )
            sd = wan_to_hf_state_dict(raw)
            model_cls = transformers.UMT5EncoderModel
        else:
            config_path = os.path.join(weights, "config.json")
            with open(config_path) as f:
                cfg = json.load(f)
            config_name, model_name = _ENCODERS[cfg["model_type"]]
            try:
                config = getattr(transformers, config_name).from_dict(cfg)
            except Exception as exc:
                raise CheckpointError(f"{config_path} is not a valid {config_name}: {exc}") from exc
            model_cls = getattr(transformers, model_name)
            # an encoder-decoder checkpoint also holds the decoder and LM head: not needed here
            sd = {
                k: v
                for k, v in _read_hf_weights(weights).items()
                if not k.startswith(("decoder.", "lm_head."))
            }
        config.dropout_rate = 0.0
        config._attn_implementation = attn_implementation
        model = _build_encoder(model_cls, config, sd, dtype, device, weights)
        return cls(model, _load_tokenizer(tok_dir), text_len)

    def tokenize(self, prompts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Cleaned prompts -> (ids, mask), both ``[B, text_len]`` int64: EOS appended, truncated, padded."""
        cleaned = clean_prompts(prompts)
        out = self.tokenizer(
            cleaned,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        return out["input_ids"], out["attention_mask"]

    def encode(self, prompts: list[str]) -> "torch.Tensor":
        """Prompts -> ``[B, text_len, text_dim]`` float32 on the encoder's device, padding rows 0.0."""
        import torch

        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = out.float()
        # positions at and after each sequence's length (the padding) are zeroed, as in Wan
        keep = torch.arange(self.text_len, device=out.device)[None, :] < mask.sum(dim=1, keepdim=True)
        return out.masked_fill(~keep[..., None], 0.0)


def load_text_encoder(path: str | os.PathLike, **kwargs) -> TextEncoder:
    """The text encoder in ``path``, picked from the directory's contents.

    Today that is ``UMT5TextEncoder`` for Wan's layout (``models_t5_umt5-xxl-enc-bf16.pth`` +
    ``google/umt5-xxl/``), an HF umT5/T5/mT5 encoder directory, or the diffusers layout
    (``text_encoder/`` + ``tokenizer/``). Keyword arguments go to ``from_pretrained``
    (text_len, device, dtype, attn_implementation). Anything else raises ``CheckpointError``
    naming the expected files.
    """
    path = os.fspath(path)
    _find_layout(path)  # raises a CheckpointError naming the expected files
    return UMT5TextEncoder.from_pretrained(path, **kwargs)
