"""Reward models for Re-DMD: score decoded frames and their prompts, without gradient.

``RewardModel.score(frames, prompts)`` takes frames [B, T, 3, H, W] in [0, 1] (the decoded video,
``clamp(x * 0.5 + 0.5, 0, 1)``) and returns one float32 reward per video, [B]. Implementations:

- ``MotionReward``: frame differences (numpy/torch only): how much the video moves, optionally
  minus a flicker term. Cheap; the procedural-video training uses it.
- ``VideoAlignReward``: the release's reward model, a Qwen2-VL-2B with a linear head giving visual
  quality (VQ), motion quality (MQ) and text alignment (TA); Re-DMD uses MQ normalised by the
  reward model's own mean / std. Loaded through ``transformers`` from a local directory.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from rf_runtime.errors import CheckpointError, ConfigError, InputError, require


class RewardModel(ABC):
    """Scores videos; the reward never carries a gradient."""

    name: str = "reward"

    @abstractmethod
    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """frames [B, T, 3, H, W] float in [0, 1], prompts: B strings -> rewards [B] float32."""

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise InputError(f"frames must be [B, T, 3, H, W] in [0, 1], got {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise InputError(
                f"{len(prompts)} prompts for {frames.shape[0]} videos: pass one prompt per video"
            )
        with torch.no_grad():
            return self.score(frames.detach(), list(prompts)).detach().to(torch.float32)


class MotionReward(RewardModel):
    """Frame-difference motion reward.

        motion  = mean_{t, pixels} |Y_{t+1} - Y_t|                 (Y = luma, Rec. 601)
        flicker = mean_{t, pixels} |Y_{t+2} - 2 Y_{t+1} + Y_t|     (temporal second difference)
        r       = (motion - flicker_weight * flicker - mean) / std

    Motion alone rewards noise and flashing; a positive ``flicker_weight`` prefers motion that is
    smooth in time. ``mean`` / ``std`` put the reward on a unit scale, as VideoAlign's normalisation
    does; measure them on the initial model's samples.
    """

    name = "motion"

    def __init__(self, mean: float = 0.0, std: float = 1.0, flicker_weight: float = 0.0):
        if not std > 0:
            raise ConfigError(f"the motion reward's std must be > 0, got {std}")
        self.mean, self.std, self.flicker_weight = float(mean), float(std), float(flicker_weight)

    def score(self, frames, prompts):
        if frames.shape[1] < 3:
            raise InputError(f"the motion reward needs at least 3 frames, got {frames.shape[1]}")
        rgb = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=frames.device)
        y = torch.einsum("btchw,c->bthw", frames.float(), rgb)
        d1 = y[:, 1:] - y[:, :-1]
        motion = d1.abs().mean(dim=(1, 2, 3))
        flicker = (d1[:, 1:] - d1[:, :-1]).abs().mean(dim=(1, 2, 3))
        return (motion - self.flicker_weight * flicker - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# VideoAlign (Qwen2-VL reward model)
# --------------------------------------------------------------------------------------------

VIDEOALIGN_CARD = "videoalign.json"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATE = (
    "Rate the generated video. Prompt: {text_prompt}\n"
    "Visual quality: <|VQ_reward|>\nMotion quality: <|MQ_reward|>\nText alignment: <|TA_reward|>"
)


def qwen2vl_video_patches(video: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int):
    """Normalised frames [T, 3, H, W] -> (patches [grid_t*grid_h*grid_w, 3*tp*p*p], (grid_t, grid_h, grid_w)).

    The layout of Qwen2-VL's image processor: the frame count is padded to a multiple of the
    temporal patch by repeating the last frame, and patches are ordered by merge window.
    """
    t, c, h, w = video.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ConfigError(
            f"frame size {h}x{w} must be a multiple of patch_size*merge_size = {patch_size * merge_size}"
        )
    if t % temporal_patch_size:
        video = torch.cat(
            [video, video[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)]
        )
    gt, gh, gw = video.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    m = merge_size
    x = video.reshape(gt, temporal_patch_size, c, gh // m, m, patch_size, gw // m, m, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


class VideoAlignReward(RewardModel):
    """VideoAlign's Qwen2-VL reward model from a local directory, no hub access.

    The directory holds a merged ``transformers`` Qwen2-VL model (``config.json``, weights,
    tokenizer files with the ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` tokens), the
    reward head ``rm_head.safetensors`` (``weight`` [3, hidden]) and ``videoalign.json``:

        {"VQ_mean": .., "VQ_std": .., "MQ_mean": .., "MQ_std": .., "TA_mean": .., "TA_std": ..,
         "prompt_template": "... {text_prompt} ... <|VQ_reward|> ... <|MQ_reward|> ... <|TA_reward|> ..."}

    The head reads the last hidden state at each reward token (the release's "special" pooling;
    output k at token k). ``output`` picks VQ, MQ (the release's choice) or TA, normalised as
    (raw - mean) / std. Frames are resized to 336 x 588 (bicubic, antialiased), normalised with
    the CLIP mean / std and patched as Qwen2-VL's processor does. ``pixel_range="release"`` feeds
    the frames in [-1, 1] as the release does (it passes the VAE output scaled by 255 to a processor
    that rescales by 1/255); ``"unit"`` feeds [0, 1] frames, as VideoAlign saw real videos.
    """

    name = "videoalign"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        output: str = "MQ",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        height: int = 336,
        width: int = 588,
        pixel_range: str = "release",
    ):
        transformers = require("transformers", "text")
        from safetensors.torch import load_file

        model_dir = os.fspath(model_dir)
        card_path = os.path.join(model_dir, VIDEOALIGN_CARD)
        head_path = os.path.join(model_dir, "rm_head.safetensors")
        for path, what in ((card_path, "the normalisation card"), (head_path, "the reward head")):
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"{path} not found ({what}): a VideoAlign directory holds a merged Qwen2-VL "
                    f"model, rm_head.safetensors and {VIDEOALIGN_CARD} (see rf_runtime.train.rewards)"
                )
        if output not in ("VQ", "MQ", "TA"):
            raise ConfigError(f"VideoAlign output must be 'VQ', 'MQ' or 'TA', got {output!r}")
        if pixel_range not in ("release", "unit"):
            raise ConfigError(f"pixel_range must be 'release' or 'unit', got {pixel_range!r}")
        with open(card_path) as f:
            card = json.load(f)
        missing = [k for k in (f"{output}_mean", f"{output}_std") if k not in card]
        if missing:
            raise ConfigError(
                f"{card_path} lacks {missing}: VideoAlign's rewards are normalised by its own mean/std"
            )
        self.mean, self.std = float(card[f"{output}_mean"]), float(card[f"{output}_std"])
        self.template = card.get("prompt_template", DEFAULT_TEMPLATE)
        if "{text_prompt}" not in self.template or any(tok not in self.template for tok in REWARD_TOKENS):
            raise ConfigError(
                f"{card_path}: prompt_template must contain {{text_prompt}} and the tokens {REWARD_TOKENS}"
            )
        self.index = ("VQ", "MQ", "TA").index(output)
        self.output, self.height, self.width, self.pixel_range = output, height, width, pixel_range
        self.device, self.dtype = torch.device(device), dtype

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        full = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        self.model = full.model.to(self.device).eval().requires_grad_(False)
        self.config = full.config
        head = load_file(head_path)["weight"]
        self.head = head.to(device=self.device, dtype=torch.float32)
        vc = self.config.vision_config
        self.patch_size, self.temporal_patch_size = vc.patch_size, vc.temporal_patch_size
        self.merge_size = vc.spatial_merge_size
        ids = self.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise CheckpointError(f"the tokenizer in {model_dir} lacks the reward tokens {REWARD_TOKENS}")
        self.reward_token_ids = ids
        self.pixel_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """One video [T, 3, H, W] in [0, 1] -> normalised [T, 3, 336, 588] float32."""
        x = frames.float()
        if self.pixel_range == "release":
            x = x * 2 - 1
        x = F.interpolate(
            x, size=(self.height, self.width), mode="bicubic", antialias=True, align_corners=False
        )
        return (x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)

    def chat_text(self, prompt: str, video_tokens: int) -> str:
        """Qwen2-VL's chat format for one user turn holding the video and the rating request."""
        video = "<|vision_start|>" + "<|video_pad|>" * video_tokens + "<|vision_end|>"
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + video
            + self.template.format(text_prompt=prompt)
            + "<|im_end|>\n<|im_start|>assistant\n"
        )

    def raw_scores(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B, 3] head outputs (VQ, MQ, TA) before normalisation, one video at a time."""
        out = []
        for video, prompt in zip(frames, prompts):
            patches, grid = qwen2vl_video_patches(
                self.preprocess(video), self.patch_size, self.temporal_patch_size, self.merge_size
            )
            n_tokens = grid[0] * grid[1] * grid[2] // self.merge_size**2
            ids = self.tokenizer(self.chat_text(prompt, n_tokens), return_tensors="pt")["input_ids"].to(
                self.device
            )
            # modality of each token for the multimodal RoPE: 2 = video, 0 = text
            types = (ids == self.config.video_token_id).to(torch.int32) * 2
            hidden = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=types,
                pixel_values_videos=patches.to(self.device, self.dtype),
                video_grid_thw=torch.tensor([grid], device=self.device),
            ).last_hidden_state[0]
            logits = hidden.float() @ self.head.T  # [L, 3]
            rows = [int((ids[0] == tid).nonzero()[0, 0]) for tid in self.reward_token_ids]
            out.append(torch.stack([logits[rows[k], k] for k in range(3)]))
        return torch.stack(out)

    def score(self, frames, prompts):
        return (self.raw_scores(frames, prompts)[:, self.index] - self.mean) / self.std
