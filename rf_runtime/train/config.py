"""The training configuration: frozen, typed dataclasses read from YAML or JSON and validated.

Every key of the file maps to a field below; an unknown key, a value of the wrong type or a
missing required path is refused with a ``ConfigError`` that names the key and says what to do.
Defaults are the release's (``configs/reward_forcing.yaml`` of Reward Forcing, SPEC section 6).
Relative paths in a config file are taken relative to the file's directory; paths given on the
command line (``rf-train --set student=DIR``) relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from rf_runtime.errors import ConfigError, require
from rf_runtime.schema import parse


@dataclass(frozen=True)
class MotionRewardConfig:
    mean: float = 0.0  # the reward is (motion - flicker_weight * flicker - mean) / std
    std: float = 1.0
    flicker_weight: float = 0.0


@dataclass(frozen=True)
class VideoAlignConfig:
    model_dir: str = ""  # merged Qwen2-VL reward model + rm_head.safetensors + videoalign.json
    output: str = "MQ"  # VQ, MQ (the release) or TA
    pixel_range: str = "release"  # "release": frames in [-1, 1] as the release feeds them; "unit": [0, 1]


@dataclass(frozen=True)
class RewardConfig:
    kind: str = "videoalign"  # videoalign | motion | none (plain DMD)
    beta: float = 0.5  # w = exp(r / beta) / Z; the release's exp(2 r) is beta = 1/2
    normalize: bool = (
        False  # False: Z = 1 (release, batch 1 per GPU); True: Z = mean of exp(r/beta) over the global batch
    )
    motion: MotionRewardConfig = field(default_factory=MotionRewardConfig)
    videoalign: VideoAlignConfig = field(default_factory=VideoAlignConfig)


@dataclass(frozen=True)
class DMDConfig:
    guidance_scale: float = 3.0
    timestep_shift: float = 5.0
    min_timestep: float = 20.0
    max_timestep: float = 980.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-6  # generator
    critic_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    critic_updates_per_generator: int = 5  # the release's dfake_gen_update_ratio
    ema_weight: float = 0.99  # generator weight EMA; 0 disables it
    ema_start_step: int = 200  # the EMA copies the generator until this step (the release's ema_start_step)


@dataclass(frozen=True)
class StreamConfig:
    """Overrides of the student's stream settings (None: the model card's, else the release's)."""

    chunk_frames: int | None = None
    sink_frames: int | None = None
    window_frames: int | None = None
    ema_alpha: float | None = None
    timesteps: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    teacher: str  # model directory of the bidirectional teacher (real score): config.json + DiT weights
    prompts: str  # text file, one prompt per line
    output_dir: str  # checkpoints and logs go here
    critic: str | None = None  # model directory the critic (fake score) starts from; default: teacher
    student: str | None = (
        None  # model directory of the student (DiT, VAE, text encoder, model card); default: teacher
    )
    student_checkpoint: str | None = (
        None  # student weights on top of its directory (e.g. an ODE-init or training checkpoint)
    )
    negative_prompt: str = ""  # the teacher's CFG negative; "" = no text (all-zero embeddings)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    num_frames: int = 21  # latent frames per rollout (21 = 7 chunks)
    fold_in_training: bool = False  # True: EMA-Sink folds happen in training rollouts (see train.rollout)
    resolution: tuple[int, int] | None = (
        None  # video height, width; default: the student's model card, else 480x832
    )
    batch_size: int = 1  # global batch (split over ranks)
    micro_batch_size: int | None = None  # per process, for gradient accumulation; None: the whole local batch
    steps: int = 600  # training steps; each step is a critic update, every Nth also a generator update
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir; 0 keeps all
    activation_checkpointing: bool = False  # recompute each block's activations in backward (student, critic)
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    cpu_threads: int | None = None  # torch intra-op threads on CPU

    def __post_init__(self):
        for name in ("teacher", "prompts", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"'{name}' is required: set it in the config file")
        check = [
            (
                self.reward.kind in ("videoalign", "motion", "none"),
                "reward.kind",
                "'videoalign', 'motion' or 'none'",
            ),
            (self.reward.beta > 0, "reward.beta", "a number > 0"),
            (self.reward.motion.std > 0, "reward.motion.std", "a number > 0"),
            (self.num_frames > 0, "num_frames", "a positive multiple of the chunk size"),
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (
                self.micro_batch_size is None or self.micro_batch_size > 0,
                "micro_batch_size",
                "a positive integer or null",
            ),
            (self.steps >= 0, "steps", "an integer >= 0"),
            (self.log_every > 0, "log_every", "a positive integer"),
            (self.checkpoint_every > 0, "checkpoint_every", "a positive integer"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "an integer >= 0"),
            (
                self.optim.critic_updates_per_generator > 0,
                "optim.critic_updates_per_generator",
                "a positive integer",
            ),
            (0 <= self.optim.ema_weight < 1, "optim.ema_weight", "a number in [0, 1)"),
            (self.optim.lr >= 0 and self.optim.critic_lr >= 0, "optim.lr / optim.critic_lr", "numbers >= 0"),
            (self.optim.grad_clip > 0, "optim.grad_clip", "a number > 0"),
            (self.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'"),
            (self.cpu_threads is None or self.cpu_threads > 0, "cpu_threads", "a positive integer or null"),
            (self.resolution is None or len(self.resolution) == 2, "resolution", "[height, width]"),
        ]
        for ok, key, want in check:
            if not ok:
                raise ConfigError(f"config key '{key}' is invalid: it must be {want}")
        self.check_paths()

    def check_paths(self):
        for key in ("teacher", "critic", "student"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                raise ConfigError(
                    f"config key '{key}': {path} is not a model directory (no config.json there); "
                    "point it to a Wan2.1-style directory, e.g. one made by "
                    "`python -m rf_runtime.testing DIR`"
                )
        if self.student_checkpoint is not None and not os.path.isfile(self.student_checkpoint):
            raise ConfigError(f"config key 'student_checkpoint': {self.student_checkpoint} does not exist")
        if not os.path.isfile(self.prompts):
            raise ConfigError(
                f"config key 'prompts': {self.prompts} does not exist; give a text file with one prompt per line"
            )
        if self.reward.kind == "videoalign" and not self.reward.videoalign.model_dir:
            raise ConfigError(
                "reward.kind is 'videoalign' but reward.videoalign.model_dir is not set: point it to the "
                "VideoAlign directory, or use reward.kind 'motion' or 'none'"
            )
        if self.reward.kind == "videoalign" and not os.path.isdir(self.reward.videoalign.model_dir):
            raise ConfigError(
                f"config key 'reward.videoalign.model_dir': {self.reward.videoalign.model_dir} "
                "is not a directory"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Reading and type checking
# --------------------------------------------------------------------------------------------

_PATH_KEYS = {
    "teacher",
    "prompts",
    "output_dir",
    "critic",
    "student",
    "student_checkpoint",
    "reward.videoalign.model_dir",
}


def _build(cls, raw: dict):
    """The typed reader every file format shares (rf_runtime.schema): names the bad key and its type."""
    return parse(
        cls,
        raw,
        where="",
        error=ConfigError,
        what="config key",
        yaml_numbers=True,
        hint="fix it in the config file (or the --set option that gave it)",
    )


def _resolve_paths(raw: dict, base: str) -> dict:
    """Make the path keys of a raw config relative to ``base`` (the config file's directory)."""
    out = dict(raw)
    for key in _PATH_KEYS:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node = None
                break
            node[p] = dict(node[p])
            node = node[p]
        if node is not None and isinstance(node.get(parts[-1]), str) and node[parts[-1]]:
            node[parts[-1]] = os.path.normpath(os.path.join(base, os.path.expanduser(node[parts[-1]])))
    return out


def config_from_dict(raw: dict, base_dir: str | None = None) -> TrainConfig:
    """Build and validate a TrainConfig from a plain dict (paths relative to ``base_dir``)."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a training config must be a mapping of keys to values, got {type(raw).__name__}: "
            "write one 'key: value' per line (see configs/tiny_redmd.yaml)"
        )
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    return _build(TrainConfig, raw)


def parse_overrides(items: list[str], cwd: str | None = None) -> dict:
    """``rf-train --set KEY=VALUE`` options as a nested mapping for :func:`load_config`.

    KEY is a config key, dotted for nested ones (``optim.lr``, ``reward.kind``); VALUE is read as YAML,
    so ``2e-5``, ``true``, ``null`` and ``[320, 576]`` get their types (the config's own reader checks
    them). Path keys are taken relative to ``cwd`` (default: the working directory), as a shell user
    expects, not to the config file's directory. A later option for the same key wins."""
    yaml = require("yaml", "train")
    cwd = os.getcwd() if cwd is None else cwd
    out: dict = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not eq or not all(parts):
            raise ConfigError(
                f"--set {item!r}: write KEY=VALUE with a config key, e.g. --set optim.lr=1e-5 "
                "or --set student=world-work/student-model"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({first})") from exc
        if key in _PATH_KEYS and isinstance(value, str) and value:
            value = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {key}: '{'.'.join(parts[: depth + 1])}' was set to a value by an earlier --set, "
                    "so it has no sub-keys"
                )
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(
                f"--set {key}: an earlier --set gave sub-keys of '{key}'; set them or the whole key, not both"
            )
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict, where: str = "") -> dict:
    """``base`` with ``extra``'s keys replacing its own, mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and out.get(key) is not None and not isinstance(out[key], dict):
            raise ConfigError(
                f"--set {name}.*: config key '{name}' is {out[key]!r} in the config file, not a mapping "
                f"with sub-keys; set '{name}' itself"
            )
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file; ``overrides`` (a nested mapping, e.g. from
    :func:`parse_overrides`, its paths absolute) replace the file's keys, mappings merged key by key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path} {'is a directory' if os.path.isdir(path) else 'does not exist'}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason}): give a YAML or JSON file"
        ) from exc
    yaml = require("yaml", "train") if path.endswith((".yaml", ".yml")) else None
    try:
        if yaml is not None:
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # the parsers raise many types
        raise ConfigError(f"could not parse {path}: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values, it holds a {type(raw).__name__}: write one "
            "'key: value' per line (see configs/tiny_redmd.yaml)"
        )
    raw = _merge(raw, overrides or {})
    return config_from_dict(raw, os.path.dirname(os.path.abspath(path)))
