"""Reward models: the frame-difference motion reward and VideoAlign on a tiny random Qwen2-VL."""

import json
import math

import pytest
import torch

from rf_runtime.errors import CheckpointError, ConfigError, InputError
from rf_runtime.train.rewards import MotionReward, VideoAlignReward, qwen2vl_video_patches


def moving_bar(speed: int, frames: int = 6, h: int = 8, w: int = 16) -> torch.Tensor:
    """A white vertical bar moving right by ``speed`` pixels per frame on black, [T, 3, H, W]."""
    video = torch.zeros(frames, 3, h, w)
    for t in range(frames):
        video[t, :, :, (t * speed) % w] = 1.0
    return video


def test_motion_reward_hand_worked():
    # a 1-pixel-wide bar (8 px tall) moving 1 px/frame: per frame pair, 2 columns = 16 of the 128
    # pixels change by 1 in luma (0.299 + 0.587 + 0.114 = 1), so motion = 16 / 128; static -> 0
    frames = torch.stack([moving_bar(1), moving_bar(0)])
    r = MotionReward()(frames, ["a", "b"])
    assert torch.allclose(r, torch.tensor([16 / 128, 0.0]), atol=1e-7)
    # normalisation and the flicker term: a bar that blinks on and off has second differences of 2
    blink = torch.zeros(6, 3, 8, 16)
    blink[::2, :, :, 3] = 1.0
    r = MotionReward(mean=0.01, std=0.5, flicker_weight=0.25)(blink[None], ["c"])
    motion, flicker = 8 / 128, 16 / 128  # |d1| = 8 px of 1 each; |d2| = 8 px of 2 each
    assert torch.allclose(r, torch.tensor([(motion - 0.25 * flicker - 0.01) / 0.5]), atol=1e-7)
    with pytest.raises(InputError, match="one prompt per video"):
        MotionReward()(frames, ["a"])
    with pytest.raises(ConfigError, match="std"):
        MotionReward(std=0)


def test_qwen2vl_patch_layout():
    """Each patch row holds one (frame pair, 14x14) cell; rows go merge window by merge window."""
    video = torch.arange(3 * 3 * 28 * 56, dtype=torch.float32).reshape(3, 3, 28, 56)
    patches, grid = qwen2vl_video_patches(video, patch_size=14, temporal_patch_size=2, merge_size=2)
    assert grid == (2, 2, 4) and patches.shape == (16, 3 * 2 * 14 * 14)  # 3 frames padded to 4
    # row 1 = frame pair 0, patch (row 0, col 1): channel 0 of frame 0 first, then frame 1
    cell = patches[1].reshape(3, 2, 14, 14)
    assert torch.equal(cell[0, 0], video[0, 0, 0:14, 14:28]) and torch.equal(
        cell[2, 1], video[1, 2, 0:14, 14:28]
    )
    # row 2 = patch (row 1, col 0) (second row of the first 2x2 merge window)
    assert torch.equal(patches[2].reshape(3, 2, 14, 14)[1, 0], video[0, 1, 14:28, 0:14])
    # the last frame pair repeats frame 2
    last = patches[8].reshape(3, 2, 14, 14)
    assert torch.equal(last[:, 0], last[:, 1]) and torch.equal(last[0, 0], video[2, 0, 0:14, 0:14])


def test_preprocessing_matches_the_qwen2vl_image_processor():
    """A one-frame video (padded to the temporal patch by repetition) is what Qwen2-VL's own image
    processor makes of an image: same CLIP normalisation, same patch order (an independent reference;
    transformers' video processor needs torchvision, so videos are patched by our code)."""
    processors = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    import numpy as np

    from rf_runtime.train.rewards import CLIP_MEAN, CLIP_STD

    img = (np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)
    ref = processors.Qwen2VLImageProcessorPil(do_resize=False)(images=[img], return_tensors="pt")
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    patches, grid = qwen2vl_video_patches(x[None], patch_size=14, temporal_patch_size=2, merge_size=2)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert torch.allclose(patches, ref["pixel_values"], atol=1e-6)


def write_tiny_videoalign(path, mq_mean=0.5, mq_std=2.0):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from safetensors.torch import save_file

    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|video_pad|>",
        "<|image_pad|>",
        "<|VQ_reward|>",
        "<|MQ_reward|>",
        "<|TA_reward|>",
        "<|endoftext|>",
    ]
    words = (
        ["[UNK]"]
        + "system you are a helpful assistant user rate the generated video prompt visual quality "
        "motion text alignment red ball bouncing blue".split()
        + [":", "."]
    )
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    fast.save_pretrained(path)
    ids = {s: fast.convert_tokens_to_ids(s) for s in specials}
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(fast),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        video_token_id=ids["<|video_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    save_file({"weight": torch.randn(3, 32)}, str(path / "rm_head.safetensors"))
    card = {
        "VQ_mean": 0.0,
        "VQ_std": 1.0,
        "MQ_mean": mq_mean,
        "MQ_std": mq_std,
        "TA_mean": 0.0,
        "TA_std": 1.0,
    }
    (path / "videoalign.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def videoalign_dir(tmp_path_factory):
    return write_tiny_videoalign(tmp_path_factory.mktemp("videoalign"))


def test_videoalign_mq_is_normalised_head_output_at_the_mq_token(videoalign_dir):
    reward = VideoAlignReward(videoalign_dir, height=56, width=84)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 5, 3, 32, 48, generator=g)
    prompts = ["a red ball bouncing", "a blue ball"]
    raw = reward.raw_scores(frames, prompts)
    r = reward(frames, prompts)
    assert r.shape == (2,) and r.dtype == torch.float32 and not r.requires_grad
    assert torch.allclose(r, (raw[:, 1] - 0.5) / 2.0)
    # independent reference: the full HF model's hidden states at the <|MQ_reward|> position through the head
    import transformers
    from safetensors.torch import load_file

    full = transformers.Qwen2VLForConditionalGeneration.from_pretrained(videoalign_dir).eval()
    head = load_file(str(videoalign_dir / "rm_head.safetensors"))["weight"]
    video = reward.preprocess(frames[0])
    assert video.shape == (5, 3, 56, 84)
    patches, grid = qwen2vl_video_patches(video, 14, 2, 2)
    ids = reward.tokenizer(
        reward.chat_text(prompts[0], grid[0] * grid[1] * grid[2] // 4), return_tensors="pt"
    )["input_ids"]
    assert int((ids == full.config.video_token_id).sum()) == 3 * 4 * 6 // 4
    with torch.no_grad():
        out = full(
            input_ids=ids,
            pixel_values_videos=patches,
            video_grid_thw=torch.tensor([grid]),
            mm_token_type_ids=(ids == full.config.video_token_id).int() * 2,
            output_hidden_states=True,
        )
    pos = int((ids[0] == reward.tokenizer.convert_tokens_to_ids("<|MQ_reward|>")).nonzero()[0, 0])
    assert torch.allclose(out.hidden_states[-1][0, pos] @ head[1], raw[0, 1], rtol=1e-4, atol=1e-5)
    # the video matters: a different video gives a different score
    assert not torch.allclose(reward(frames.flip(0), prompts), r)


def test_videoalign_directory_errors(tmp_path, videoalign_dir):
    with pytest.raises(CheckpointError, match="rm_head"):
        VideoAlignReward(tmp_path)
    with pytest.raises(ConfigError, match="'VQ', 'MQ' or 'TA'"):
        VideoAlignReward(videoalign_dir, output="XX")


def test_trainer_with_the_videoalign_reward(videoalign_dir, tmp_path):
    """The trainer decodes its rollout, scores it with VideoAlign (MQ, normalised) and logs the
    statistics of exactly those scores."""
    from rf_runtime.testing import write_model_dir
    from rf_runtime.train.config import config_from_dict
    from rf_runtime.train.trainer import Trainer

    write_model_dir(tmp_path / "model")
    (tmp_path / "p.txt").write_text("a red ball bouncing\n")
    cfg = config_from_dict(
        dict(
            teacher=str(tmp_path / "model"),
            prompts=str(tmp_path / "p.txt"),
            output_dir=str(tmp_path / "out"),
            reward=dict(kind="videoalign", beta=0.5, videoalign=dict(model_dir=str(videoalign_dir))),
            num_frames=3,
            batch_size=1,
            steps=1,
        )
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.reward_model, VideoAlignReward) and trainer.reward_model.output == "MQ"
    scored = []
    real_score = trainer.reward_model.score

    def spy(frames, prompts):
        scored.append(real_score(frames, prompts))
        return scored[-1]

    trainer.reward_model.score = spy
    values = next(iter(trainer.train())).values
    assert len(scored) == 1 and values["reward_mean"] == pytest.approx(float(scored[0][0]))
    # Z = 1: the loss is exp(2 r) times the DMD loss
    assert values["generator_loss"] == pytest.approx(
        math.exp(2 * values["reward_mean"]) * values["dmd_loss"], rel=1e-5
    )
