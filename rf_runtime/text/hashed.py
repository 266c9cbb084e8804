"""A tiny text encoder with no weights and no dependencies: every word is mapped to a fixed
pseudo-random vector (seeded by a stable hash of the word), placed at its position in the prompt.

It gives small models trained with this project (and tests) a deterministic, torch-free text
conditioning. It knows nothing about language beyond word identity and order; use umT5 for the
released models.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import ConfigError, InputError

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class HashedTextEncoder:
    text_dim: int = 32
    text_len: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.text_dim < 1 or self.text_len < 1:
            raise ConfigError(f"text_dim and text_len must be positive, got {self.text_dim}, {self.text_len}")

    def tokenize(self, prompt: str) -> list[str]:
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
        words = _WORD.findall(prompt.lower())
        if not words:
            raise InputError(f"the prompt {prompt!r} has no words: describe the video to generate")
        return words[: self.text_len]

    def word_vector(self, word: str) -> np.ndarray:
        key = zlib.crc32(word.encode()) ^ (self.seed * 0x9E3779B1 & 0xFFFFFFFF)
        rng = np.random.Generator(np.random.PCG64(key))
        return rng.standard_normal(self.text_dim, dtype=np.float32)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """prompts -> [B, text_len, text_dim] float32; positions after the last word are zero."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = np.zeros((len(prompts), self.text_len, self.text_dim), np.float32)
        for b, prompt in enumerate(prompts):
            for i, word in enumerate(self.tokenize(prompt)):
                out[b, i] = self.word_vector(word)
        return out

    def to_dict(self) -> dict:
        return {"kind": "hashed", "text_dim": self.text_dim, "text_len": self.text_len, "seed": self.seed}
