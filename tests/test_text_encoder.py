"""The umT5 text encoder against Wan2.1's reference implementation (SPEC section 5).

``tests/golden/t5_tiny.safetensors`` was produced by running Wan2.1's own code (the copy in the
Reward Forcing repository: ``wan/modules/t5.py`` ``T5Encoder`` and ``wan/modules/tokenizers.py``
``HuggingfaceTokenizer``) in fp32 on CPU, in eval mode:

* ``sd.*``: the weights of a tiny umT5-style ``T5Encoder`` (vocab 64, dim 32, dim_attn 32,
  dim_ffn 64, 4 heads, 2 layers, 32 relative-position buckets, ``shared_pos=False`` so every layer
  has its own position bias), random from seed 0, with the RMS-norm weights also randomized so a
  swapped norm would show; key names as in Wan's ``models_t5_umt5-xxl-enc-bf16.pth``;
* ``ids``, ``mask``, ``out``: the encoder run on fixed token ids of batch 2 and length 24 (19 and 7
  valid tokens, EOS last, pad 0), with the outputs at padding positions zeroed as Reward Forcing's
  ``WanTextEncoder`` does;
* ``e2e.ids``, ``e2e.mask``, ``e2e.out``: the whole ``WanTextEncoder.forward`` path, Wan's
  ``HuggingfaceTokenizer(seq_len=16, clean="whitespace")`` over the tokenizer ``make_tokenizer``
  below builds, then the same encoder, on the prompts stored in the metadata (``e2e.prompts``),
  one longer than 16 tokens so truncation shows;
* metadata ``clean``: pairs (text, Wan's ``whitespace_clean(basic_clean(text))``) with ftfy 6.3.

Tolerance: relative error ||a - b|| / ||b|| < 1e-4 over the non-padding positions (fp32, the
kernels differ only in summation order), padding positions exactly 0.
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from rf_runtime.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from rf_runtime.text.umt5 import (  # noqa: E402
    WAN_T5_FILE,
    TextEncoder,
    UMT5TextEncoder,
    clean_prompt,
    load_text_encoder,
    wan_to_hf_state_dict,
)

TOL = 1e-4
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "t5_tiny.safetensors")

WORDS = (
    "a an the cat dog red blue ball runs jumps over under green field river sky city night rain "
    "at in of on with slowly camera pan"
).split()


def make_tokenizer(path):
    """A 57-token T5 (Unigram) tokenizer: pad 0, EOS 1, unk 2, whole words and single letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in WORDS] + [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(path))
    return path


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def valid(mask):
    return mask.bool()[..., None]


def tiny_config():
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
    )


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "pt") as f:
        meta = f.metadata()
    tensors = load_file(GOLDEN)
    wan_sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return tensors, wan_sd, meta


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory, golden):
    """Wan2.1-T2V-1.3B layout: the DiT's config.json, the T5 .pth and google/umt5-xxl/."""
    d = tmp_path_factory.mktemp("Wan2.1-T2V-1.3B")
    (d / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536}))
    torch.save(golden[1], d / WAN_T5_FILE)
    make_tokenizer(d / "google" / "umt5-xxl")
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, golden):
    """A Hugging Face umT5 encoder directory (config.json, model.safetensors, tokenizer files)."""
    from transformers import UMT5EncoderModel

    d = tmp_path_factory.mktemp("umt5_hf")
    model = UMT5EncoderModel(tiny_config())
    model.load_state_dict(wan_to_hf_state_dict(golden[1]), strict=True)
    model.save_pretrained(str(d))
    make_tokenizer(d)
    return d


def test_interface():
    assert issubclass(UMT5TextEncoder, TextEncoder)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_matches_wan_t5(golden, attn):
    from transformers import UMT5EncoderModel

    tensors, wan_sd, _ = golden
    cfg = tiny_config()
    cfg._attn_implementation = attn
    model = UMT5EncoderModel(cfg).eval()
    model.load_state_dict(wan_to_hf_state_dict(wan_sd), strict=True)
    ids, mask, ref = tensors["ids"], tensors["mask"], tensors["out"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = valid(mask)
    assert rel(out * m, ref) < TOL
    assert torch.all(ref[~m.expand_as(ref)] == 0)


def test_wan_key_mapping_rejects_unknown_keys(golden):
    sd = dict(golden[1])
    sd["blocks.0.attn.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="blocks.0.attn.bias"):
        wan_to_hf_state_dict(sd)


def test_clean_prompt_matches_wan(golden):
    pairs = json.loads(golden[2]["clean"])
    assert len(pairs) > 10
    # the built-in cleaning (no ftfy) matches on well-formed text; the last case is mojibake,
    # which only ftfy repairs
    for text, ref in pairs[:-1]:
        assert clean_prompt(text, use_ftfy=False) == ref, text
    pytest.importorskip("ftfy")
    for text, ref in pairs:
        assert clean_prompt(text) == ref, text
    assert clean_prompt(pairs[-1][0], use_ftfy=False) != pairs[-1][1]


def test_end_to_end_matches_wan(golden, wan_dir):
    tensors, _, meta = golden
    prompts = json.loads(meta["e2e.prompts"])
    enc = UMT5TextEncoder.from_pretrained(wan_dir, text_len=16, attn_implementation="eager")
    ids, mask = enc.tokenize(prompts)
    assert torch.equal(ids, tensors["e2e.ids"]) and torch.equal(mask, tensors["e2e.mask"])
    out = enc.encode(prompts)
    ref = tensors["e2e.out"]
    assert out.dtype == torch.float32 and out.shape == ref.shape == (len(prompts), 16, 32)
    m = valid(mask)
    assert rel(out, ref) < TOL
    assert torch.all(out[~m.expand_as(out)] == 0)


@pytest.mark.parametrize("layout", ["wan", "hf"])
def test_from_pretrained_both_layouts(layout, wan_dir, hf_dir, golden):
    d = wan_dir if layout == "wan" else hf_dir
    enc = UMT5TextEncoder.from_pretrained(d, text_len=12)
    assert (enc.text_len, enc.text_dim) == (12, 32)
    prompts = ["a red cat jumps over the dog", "the blue ball"]
    out = enc.encode(prompts)
    assert out.shape == (2, 12, 32) and out.dtype == torch.float32
    _, mask = enc.tokenize(prompts)
    lengths = mask.sum(1).tolist()
    assert lengths == [8, 4]  # words + EOS
    for b, n in enumerate(lengths):
        assert torch.all(out[b, n:] == 0) and torch.all(out[b, :n].abs().sum(-1) > 0)
    assert not torch.allclose(out[0, :4], out[1, :4])
    assert torch.equal(enc.encode(prompts), out)  # deterministic
    assert torch.equal(enc.encode(["the blue ball"])[0], out[1])  # independent of the batch
    # both layouts hold the same weights: the same embeddings
    other = UMT5TextEncoder.from_pretrained(hf_dir if layout == "wan" else wan_dir, text_len=12)
    assert rel(other.encode(prompts), out) < 1e-6


def test_bfloat16_weights(wan_dir):
    enc = UMT5TextEncoder.from_pretrained(wan_dir, text_len=8, dtype="bfloat16")
    assert enc.dtype == torch.bfloat16
    ref = UMT5TextEncoder.from_pretrained(wan_dir, text_len=8).encode(["a cat"])
    out = enc.encode(["a cat"])
    assert out.dtype == torch.float32 and rel(out, ref) < 0.05
    assert torch.all(out[0, 3:] == 0)


def test_load_text_encoder_picks_layout(wan_dir, hf_dir, tmp_path):
    assert isinstance(load_text_encoder(wan_dir, text_len=8), UMT5TextEncoder)
    assert isinstance(load_text_encoder(hf_dir, text_len=8), UMT5TextEncoder)
    assert isinstance(load_text_encoder(wan_dir / WAN_T5_FILE, text_len=8), UMT5TextEncoder)
    # diffusers layout: text_encoder/ + tokenizer/
    import shutil

    shutil.copytree(hf_dir, tmp_path / "text_encoder")
    make_tokenizer(tmp_path / "tokenizer")
    assert isinstance(load_text_encoder(tmp_path, text_len=8), UMT5TextEncoder)
    # a directory with only a DiT config.json is not a text encoder
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "config.json").write_text(json.dumps({"model_type": "t2v"}))
    with pytest.raises(CheckpointError, match=WAN_T5_FILE) as e:
        load_text_encoder(dit)
    assert "config.json" in str(e.value) and str(dit) in str(e.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    for load in (load_text_encoder, UMT5TextEncoder.from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(missing)
        msg = str(e.value)
        assert str(missing) in msg and WAN_T5_FILE in msg and "umt5-xxl" in msg and "model.safetensors" in msg


def test_missing_tokenizer(tmp_path, golden):
    torch.save(golden[1], tmp_path / WAN_T5_FILE)
    with pytest.raises(CheckpointError, match="google/umt5-xxl"):
        UMT5TextEncoder.from_pretrained(tmp_path)


def test_strict_loading(tmp_path, golden):
    make_tokenizer(tmp_path / "google" / "umt5-xxl")
    sd = dict(golden[1])
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, tmp_path / WAN_T5_FILE)
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.1\.norm2\.weight"):
        UMT5TextEncoder.from_pretrained(tmp_path)
    sd = dict(golden[1], **{"blocks.0.ffn.extra.weight": torch.zeros(2)})
    torch.save(sd, tmp_path / WAN_T5_FILE)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.0\.ffn\.extra\.weight"):
        UMT5TextEncoder.from_pretrained(tmp_path)


def test_strict_loading_hf(tmp_path, hf_dir):
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    sd = load_file(d / "model.safetensors")
    sd.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
    sd["encoder.block.9.layer.0.layer_norm.weight"] = torch.ones(32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: .*relative_attention_bias") as e:
        UMT5TextEncoder.from_pretrained(d)
    assert "unexpected keys: encoder.block.9" in str(e.value)


@pytest.fixture(scope="module")
def encoder(wan_dir):
    return UMT5TextEncoder.from_pretrained(wan_dir, text_len=8)


@pytest.mark.parametrize("prompts", [[""], ["a cat", "   \n\t "], "\u3000"])
def test_empty_prompt(encoder, prompts):
    with pytest.raises(InputError, match="empty"):
        encoder.encode(prompts)


@pytest.mark.parametrize("prompts", [[3], ["a cat", None], [b"a cat"]])
def test_non_string_prompt(encoder, prompts):
    with pytest.raises(InputError, match="must be a string"):
        encoder.encode(prompts)


def test_no_prompts(encoder):
    with pytest.raises(InputError, match="non-empty list"):
        encoder.encode([])


def test_bad_settings(wan_dir):
    with pytest.raises(ConfigError, match="text_len"):
        UMT5TextEncoder.from_pretrained(wan_dir, text_len=0)
    with pytest.raises(ConfigError, match="dtype"):
        UMT5TextEncoder.from_pretrained(wan_dir, dtype="float48")
