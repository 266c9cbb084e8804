"""Training the small world model on CPU: a Wan VAE, a bidirectional teacher DiT, a causal student.

The models are the project's own (``rf_runtime.models``) at small sizes (``WorldConfig``); the
data is the procedural world (``rf_runtime.world.procedural``). Three stages, each a function that
returns the trained module and a list of per-step logs:

1. ``train_vae``: autoencoder on pixel clips, loss = weighted pixel MSE + kl_weight * KL.
   Then ``latent_stats`` sets the per-channel latent mean/std in the VAE config (Wan normalises
   latents with such constants), so the DiT sees latents of unit scale.
2. ``train_teacher``: ``CausalDiT.forward_full`` on whole latent clips, flow matching
   (x_t = (1 - s) x0 + s eps, target v = eps - x0), s drawn through the shift-5 table (SPEC 2, 6).
3. ``train_student``: the same weights run causally, chunk by chunk, through the streaming KV cache
   (``models.rollout.chunk_loop``: sink + window + EMA-Sink fold) with clean context from the data
   (teacher forcing); the loss is the same flow-matching loss on each noisy chunk. Half of the
   chunks are noised at the sampler's own steps, which are the only ones the student runs at.

Library code: no prints, no progress bars; ``on_step(step, logs)`` lets a CLI show progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rf_runtime import model_dir
from rf_runtime.errors import ConfigError, InputError
from rf_runtime.files import atomic_save, atomic_write_json, json_ready
from rf_runtime.models import CausalDiT, DiTConfig
from rf_runtime.models.rollout import ChunkRollout, chunk_loop
from rf_runtime.models.vae import VAEConfig, WanVAE
from rf_runtime.sampler import StreamSettings, shift_sigma
from rf_runtime.text.hashed import HashedTextEncoder
from rf_runtime.world import heldout, procedural

logger = logging.getLogger("rf_runtime")


def _small_vae(z: int = 8) -> VAEConfig:
    # Spatial stride 8 as Wan, but no temporal compression: a VAE this small, trained for minutes on one
    # core, blurs shapes and shifts colours when it must also pack 4 frames into one (measured: PSNR 18 dB
    # after 26 min with stride (4, 8, 8)); one latent frame per video frame is easy for it. z: latent
    # channels (8 for the models up to the ninth session; Wan2.1's VAE has 16).
    return VAEConfig(
        dim=16,
        z_dim=z,
        dim_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        attn_scales=(),
        temperal_downsample=(False, False, False),
        latents_mean=(0.0,) * z,
        latents_std=(1.0,) * z,
    )


def _small_text() -> HashedTextEncoder:
    return HashedTextEncoder(text_dim=32, text_len=16, seed=0)


def _small_dit() -> DiTConfig:
    text = _small_text()
    return DiTConfig(
        in_dim=8,
        out_dim=8,
        dim=96,
        ffn_dim=384,
        freq_dim=64,
        text_dim=text.text_dim,
        text_len=text.text_len,
        num_heads=4,
        num_layers=4,
    )


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world model. Frames must be multiples of VAE stride x patch (8 x 2 = 16)."""

    height: int = 64
    width: int = 64
    vae: VAEConfig = field(default_factory=_small_vae)
    dit: DiTConfig = field(default_factory=_small_dit)
    text: HashedTextEncoder = field(default_factory=_small_text)
    stream: StreamSettings = field(default_factory=StreamSettings)
    # latent clip length for the DiTs, in chunks: 7 x 3 = 21 latent frames, the release's training length.
    # With the default cache, chunk 2 already attends at the steady-state positions (sink 0..2, window
    # 3..5, itself 6..8); chunks 3..6 each follow an eviction and EMA-Sink fold (4 folds per clip: the
    # student learns to keep the object's identity across folds, not only up to the first one).
    clip_chunks: int = 7

    def __post_init__(self):
        stride = self.vae.stride[1]
        unit_h, unit_w = stride * self.dit.patch_size[1], stride * self.dit.patch_size[2]
        if self.height % unit_h or self.width % unit_w:
            raise ConfigError(
                f"frames {self.height}x{self.width} must be multiples of {unit_h}x{unit_w} "
                "(VAE stride x patch size)"
            )
        if self.vae.z_dim != self.dit.in_dim or self.dit.in_dim != self.dit.out_dim:
            raise ConfigError(
                f"the DiT's in_dim/out_dim ({self.dit.in_dim}/{self.dit.out_dim}) must equal the "
                f"VAE's z_dim ({self.vae.z_dim})"
            )
        if (self.text.text_dim, self.text.text_len) != (self.dit.text_dim, self.dit.text_len):
            raise ConfigError("the text encoder's text_dim/text_len must match the DiT's")

    def with_vae(self, vae: VAEConfig) -> "WorldConfig":
        """This config for another VAE (e.g. one loaded from a file): the DiT's in/out channels follow
        its ``z_dim``."""
        dit = dataclasses.replace(self.dit, in_dim=vae.z_dim, out_dim=vae.z_dim)
        return dataclasses.replace(self, vae=vae, dit=dit)

    def with_latent_channels(self, z_dim: int) -> "WorldConfig":
        """This config for latents of ``z_dim`` channels: a fresh small VAE of that width (its
        normalisation unmeasured) and the DiT's in/out channels to match."""
        if z_dim == self.vae.z_dim:
            return self
        if not z_dim >= 1:
            raise ConfigError(f"z_dim must be >= 1, got {z_dim}")
        vae = dataclasses.replace(
            self.vae, z_dim=z_dim, latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim
        )
        return self.with_vae(vae)

    @property
    def latent_frames(self) -> int:
        return self.clip_chunks * self.stream.chunk_frames

    @property
    def pixel_frames(self) -> int:
        return 1 + self.vae.stride[0] * (self.latent_frames - 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae.stride[1], self.width // self.vae.stride[2]


TINY = WorldConfig(
    height=32,
    width=32,
    vae=VAEConfig(
        dim=4,
        z_dim=4,
        dim_mult=(1, 1, 1, 1),
        num_res_blocks=1,
        attn_scales=(),
        temperal_downsample=(False, True, True),
        latents_mean=(0.0,) * 4,
        latents_std=(1.0,) * 4,
    ),
    dit=DiTConfig(
        in_dim=4,
        out_dim=4,
        dim=32,
        ffn_dim=48,
        freq_dim=16,
        text_dim=8,
        text_len=16,
        num_heads=2,
        num_layers=2,
    ),
    text=HashedTextEncoder(text_dim=8, text_len=16, seed=0),
    clip_chunks=4,
)
"""Seconds-sized config for smoke tests (4 chunks, so the cache evicts and folds once)."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def to_pixels(videos: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _scene_on(background: str, rng: np.random.Generator, cfg: WorldConfig) -> procedural.Scene:
    """The first scene, from seeds drawn from ``rng``, whose background is ``background``."""
    while True:
        scene = procedural.sample_scene(int(rng.integers(0, 2**31)), cfg.height, cfg.width)
        if scene.background == background:
            return scene


def sample_clips(
    rng: np.random.Generator, cfg: WorldConfig, batch: int, num_frames: int, balance_backgrounds: bool = False
):
    """A batch of fresh procedural scenes (seeds drawn from ``rng``) -> (scenes, pixels [B, 3, T, H, W]).

    balance_backgrounds: each scene's background is drawn first, black, gray and white a third each,
    and seeds are drawn until a scene has it (``sample_scene`` alone gives black two thirds of the time)."""
    if balance_backgrounds:
        names = list(procedural.BACKGROUNDS)
        scenes = [_scene_on(names[rng.integers(len(names))], rng, cfg) for _ in range(batch)]
    else:
        seeds = rng.integers(0, 2**31, size=batch)
        scenes = [procedural.sample_scene(int(s), cfg.height, cfg.width) for s in seeds]
    return scenes, to_pixels(np.stack([procedural.render(s, num_frames) for s in scenes]))


@dataclass
class LatentData:
    """Encoded clips for the DiTs: latents [N, F, C, H, W] (normalised), text embeddings, prompts.

    ``trajectory`` [N, S, F, C, H, W] (only in ODE pairs, ``teacher_ode_pairs``): the teacher's ODE
    path at the stream sampler's S noise levels, whose endpoint is ``latents``."""

    latents: torch.Tensor
    text: torch.Tensor
    prompts: list[str]
    trajectory: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        """Latent channels (the encoding VAE's z_dim)."""
        return int(self.latents.shape[2])

    def batch(self, rng: np.random.Generator, size: int):
        idx = torch.from_numpy(rng.integers(0, len(self.prompts), size=size))
        return self.latents[idx], self.text[idx]

    def ode_batch(self, rng: np.random.Generator, size: int):
        """(trajectory, endpoint latents, text) of ``size`` random ODE pairs."""
        if self.trajectory is None:
            raise InputError(
                "these latents hold no ODE trajectories: make ODE pairs with "
                "`rf-world ode-pairs --teacher T --out FILE` for the ode objective"
            )
        idx = torch.from_numpy(rng.integers(0, len(self.prompts), size=size))
        return self.trajectory[idx], self.latents[idx], self.text[idx]

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {"latents": self.latents.contiguous(), "text": self.text.contiguous()}
        if self.trajectory is not None:
            tensors["trajectory"] = self.trajectory.contiguous()
        atomic_save(
            lambda tmp: save_file(tensors, tmp, metadata={"prompts": json.dumps(self.prompts)}),
            path,
            create_folder=True,
        )

    @classmethod
    def load(cls, path: str) -> "LatentData":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise InputError(
                f"latent data {path} does not exist: make it with `rf-world encode --vae VAE --out {path}`"
            )
        with safe_open(path, "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            trajectory = f.get_tensor("trajectory") if "trajectory" in f.keys() else None
            return cls(f.get_tensor("latents"), f.get_tensor("text"), prompts, trajectory)


@torch.no_grad()
def encode_dataset(
    vae: WanVAE,
    cfg: WorldConfig,
    num_videos: int,
    *,
    seed: int = 1_000_000,
    batch: int = 16,
    max_seconds: float | None = None,
    on_step=None,
) -> LatentData:
    """Render ``num_videos`` training scenes (``heldout.training_scenes``: seeds from ``seed`` on, the
    held-out prompts skipped, backgrounds a third each) of ``cfg.pixel_frames`` frames and encode them;
    after ``max_seconds`` it stops at the end of a batch and returns the clips encoded so far."""
    vae.eval()
    start_time = time.perf_counter()
    latents, prompts = [], []
    all_scenes = heldout.training_scenes(num_videos, seed, cfg.height, cfg.width)
    for start in range(0, num_videos, batch):
        n = min(batch, num_videos - start)
        scenes = all_scenes[start : start + n]
        pixels = to_pixels(np.stack([procedural.render(s, cfg.pixel_frames) for s in scenes]))
        latents.append(vae.encode(pixels).transpose(1, 2))  # [B, F, C, H, W]
        prompts += [s.prompt for s in scenes]
        if on_step:
            on_step(start + n, {})
        if max_seconds is not None and time.perf_counter() - start_time > max_seconds:
            logger.info("stopping after %d clips: time budget of %.0f s spent", len(prompts), max_seconds)
            break
    text = torch.from_numpy(cfg.text.encode(prompts))
    return LatentData(torch.cat(latents), text, prompts)


# --------------------------------------------------------------------------------------------
# Stage 1: the VAE
# --------------------------------------------------------------------------------------------


def decode_train(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """Decode normalised latents [B, C, F, H, W] frame by frame with the feature cache, unclamped
    (``WanVAE.decode`` clamps, which stops gradients outside [-1, 1])."""
    slots: list = []
    return torch.cat(
        [vae.decode_step(z[:, :, i : i + 1], slots, first=i == 0) for i in range(z.shape[2])], dim=2
    )


def vae_loss(vae: WanVAE, pixels: torch.Tensor, kl_weight: float, fg_weight: float):
    """Pixel MSE weighted towards the shape + kl_weight * KL(q(z|x) || N(0, 1)) per latent element.

    The shape covers a few percent of a frame; pixels that differ from the frame's corner pixel
    (the background) weigh ``1 + fg_weight``, so the small moving shape is not traded for the background.
    Returns (loss, logs).
    """
    mu, log_var = vae.encode_moments(pixels)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
    recon = decode_train(vae, (z - vae.latents_mean) * vae.latents_inv_std)
    background = pixels[..., :1, :1]
    weight = 1.0 + fg_weight * ((pixels - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    mse = ((recon - pixels) ** 2 * weight).mean() / weight.mean()
    kl = 0.5 * (mu**2 + log_var.exp() - 1.0 - log_var).mean()
    loss = mse + kl_weight * kl
    return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


def train_vae(
    cfg: WorldConfig,
    *,
    steps: int,
    batch: int = 4,
    clip_frames: int = 9,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    fg_weight: float = 4.0,
    seed: int = 0,
    max_seconds: float | None = None,
    crop: int | None = None,
    init: WanVAE | None = None,
    decoder_only: bool = False,
    encoder_only: bool = False,
    balance_backgrounds: bool = False,
    on_step=None,
) -> tuple[WanVAE, list[dict]]:
    """Train the VAE as an autoencoder on fresh procedural clips; stops after ``steps`` or ``max_seconds``.

    clip_frames: frames per training clip, 1 + k x the temporal stride. Keep it long (default 9): the
        stacked causal convolutions see many frames back, and a VAE trained on 3-frame clips reconstructs
        the first frame well and later frames badly (measured: 10.6 dB PSNR over 12 frames).
    crop: train on random crop x crop windows of the frames (the VAE is convolutional; a 32 x 32
        crop of 64 x 64 frames makes a step about 4x cheaper). A multiple of the spatial stride.
    init: continue from these weights.
    decoder_only: train the decoder (``conv2``, ``decoder``) and freeze the encoder, so latents already
        encoded (and DiTs trained on them) stay valid while the pictures get better.
    encoder_only: train the encoder (``conv1``, ``encoder``) and freeze the decoder, e.g. to fit a fresh
        encoder to a decoder taken out of a bundle (``from_bundle.vae_from_bundle``): the latent space
        stays the decoder's, so a DiT trained on it still fits.
    balance_backgrounds: black, gray and white backgrounds a third each (``sample_clips``).
    """
    if decoder_only and encoder_only:
        raise ConfigError("decoder_only and encoder_only exclude each other: choose the part to train")
    if not fg_weight >= 0:
        raise ConfigError(f"fg_weight must be >= 0 (0: plain MSE), got {fg_weight}")
    stride = cfg.vae.stride[1]
    if crop is not None and (crop % stride or crop < stride or crop > min(cfg.height, cfg.width)):
        raise ConfigError(f"crop must be a multiple of {stride} no larger than the frame, got {crop}")
    if (clip_frames - 1) % cfg.vae.stride[0]:
        raise ConfigError(f"clip_frames must be 1 + {cfg.vae.stride[0]}k, got {clip_frames}")
    vae, rng = _start(
        lambda: WanVAE(init.config if init is not None else cfg.vae), init, seed
    )  # init's normalisation
    decoder = ("decoder.", "conv2.")
    params = [
        p
        for n, p in vae.named_parameters()
        if not (decoder_only or encoder_only) or n.startswith(decoder) == decoder_only
    ]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _warmup_decay(opt, steps, warmup=50)

    def step():
        pixels = sample_clips(rng, cfg, batch, clip_frames, balance_backgrounds)[1]
        if crop is not None:
            y, x = (int(rng.integers(0, n - crop + 1)) for n in pixels.shape[-2:])
            pixels = pixels[..., y : y + crop, x : x + crop]
        return _step(opt, sched, vae, vae_loss(vae, pixels, kl_weight, fg_weight))

    return vae.eval(), _loop(steps, max_seconds, on_step, step)


def ema_decay(updates: int, decay: float) -> float:
    """The EMA's decay at its ``updates``-th update: min(decay, (1 + n) / (10 + n)).

    The warm-up of diffusers' ``EMAModel``: a constant 0.999 over the 1,300 steps of a teacher run keeps
    0.999^1300 = 27 % of the first step's weights (for a rechannelled init, its fresh latent layers) in
    the average; with the warm-up the first steps' share falls as about 10 / n.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _warm_ema_fn(decay: float):
    """``AveragedModel``'s multi_avg_fn for ``ema_decay`` (it passes the updates done so far, >= 1)."""

    def average(ema_params, params, num_averaged):
        torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay(int(num_averaged), decay))

    return average


def _start(make, init: torch.nn.Module | None, seed: int):
    """``make()`` after seeding torch (so a fresh init is reproducible), in training mode, with
    ``init``'s weights if given; and the numpy generator of the run."""
    torch.manual_seed(seed)
    model = make()
    if init is not None:
        model.load_state_dict(init.state_dict())
    return model.train(), np.random.Generator(np.random.PCG64(seed))


def _warmup_decay(opt, steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 10 % of the rate at ``steps``."""
    total = max(steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * (1 - s / total))
    )


def _step(opt, sched, model, loss_logs, clip: float = 1.0) -> dict:
    loss, logs = loss_logs
    opt.zero_grad(set_to_none=True)
    loss.backward()
    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    sched.step()
    return logs


def _loop(steps: int, max_seconds: float | None, on_step, step_fn, log_every: int = 25) -> list[dict]:
    history, start = [], time.perf_counter()
    for step in range(steps):
        logs = step_fn()
        logs["step"], logs["seconds"] = step, round(time.perf_counter() - start, 2)
        history.append(logs)
        if on_step:
            on_step(step, logs)
        if step % log_every == 0 or step + 1 == steps:
            logger.info(
                "step %d (%.0f s): %s",
                step,
                logs["seconds"],
                " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k not in ("step", "seconds")),
            )
        if max_seconds is not None and logs["seconds"] > max_seconds:
            logger.info("stopping at step %d: time budget of %.0f s spent", step, max_seconds)
            break
    return history


@torch.no_grad()
def latent_stats(vae: WanVAE, cfg: WorldConfig, num_videos: int = 64, seed: int = 123) -> VAEConfig:
    """The VAE config with ``latents_mean``/``latents_std`` measured on procedural clips (per channel)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    mus = []
    for _ in range(0, num_videos, 16):
        mu, _ = vae.encode_moments(sample_clips(rng, cfg, 16, cfg.pixel_frames)[1])
        mus.append(mu.transpose(0, 1).flatten(1))
    mu = torch.cat(mus, dim=1)
    mean, std = mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-3)
    return dataclasses.replace(vae.config, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))


def with_config(vae: WanVAE, config: VAEConfig) -> WanVAE:
    """The same weights under another config (new latent normalisation constants)."""
    return WanVAE.from_state_dict(vae.state_dict(), config).eval()


# --------------------------------------------------------------------------------------------
# Stages 2 and 3: teacher and student
# --------------------------------------------------------------------------------------------


def shifted_sigma(rng: np.random.Generator, size, shift: float) -> np.ndarray:
    """Noise levels for flow-matching training: s ~ U(0, 1) warped by s' = shift s / (1 + (shift - 1) s),
    the table the sampler uses (SPEC 2), so training puts its weight where sampling runs."""
    return shift_sigma(rng.uniform(0.0, 1.0, size=size), shift)


def foreground_weight(x_t: torch.Tensor, fg_weight: float, threshold: float = 0.75) -> torch.Tensor | None:
    """Per-position loss weights for the model's noisy input latents x_t [B, F, C, H, W]: 1 + fg_weight
    where any channel differs from the frame's median latent (the background: it covers most of a frame)
    by more than ``threshold`` (normalised latents have unit std; the conv padding alone moves border
    cells by up to about 0.7).

    The shape covers a few latent cells of a frame; without a weight the loss is mostly background and a
    small model learns the backdrop long before the object. The weight is a function of what the model
    sees (x_t, not the target x0): then at every input the loss is a weighted MSE with a weight that does
    not vary with the target, so its minimiser stays the conditional mean E[v | x_t, t, text] and only the
    model's effort moves. (A weight computed from x0 tilts the learnt distribution towards frames with
    more foreground.) At high noise almost every cell stands out, so the weight flattens to uniform."""
    if fg_weight <= 0:
        return None
    background = x_t.flatten(-2).median(dim=-1).values[..., None, None]
    mask = ((x_t - background).abs().amax(dim=2, keepdim=True) > threshold).to(x_t.dtype)
    return 1.0 + fg_weight * mask


def flow_loss(
    pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Flow matching: the network predicts v = eps - x0 (SPEC 2); ``weight`` broadcasts over the error
    and the result is normalised by its mean, so the loss keeps the scale of the plain MSE."""
    err = (pred - (eps - x0)) ** 2
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).mean() / weight.mean()


def drop_text(text: torch.Tensor, rng: np.random.Generator, p: float) -> torch.Tensor:
    """Replace the prompt by no text (all-zero embeddings, what rf-train's empty negative prompt gives)
    for a fraction ``p`` of the samples, so the model also learns the unconditional velocity that
    classifier-free guidance needs."""
    if p <= 0:
        return text
    keep = torch.from_numpy(rng.random(text.shape[0]) >= p).to(text.dtype).view(-1, 1, 1)
    return text * keep


def teacher_loss(
    model: CausalDiT,
    latents,
    text,
    rng: np.random.Generator,
    shift: float,
    text_dropout: float = 0.0,
    fg_weight: float = 0.0,
):
    """One t per clip, every frame noised to it, bidirectional forward. Returns (loss, logs)."""
    b, f = latents.shape[:2]
    sigma = torch.from_numpy(shifted_sigma(rng, b, shift)).float().view(b, 1, 1, 1, 1)
    eps = torch.randn_like(latents)
    x_t = (1 - sigma) * latents + sigma * eps
    t = (sigma.view(b, 1) * 1000).expand(b, f)
    pred = model.forward_full(x_t, t, drop_text(text, rng, text_dropout))
    loss = flow_loss(pred, latents, eps, foreground_weight(x_t, fg_weight))  # weight from the input only
    return loss, {"loss": float(loss.detach())}


def train_teacher(
    cfg: WorldConfig,
    data: LatentData,
    *,
    steps: int,
    batch: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    max_seconds: float | None = None,
    init: CausalDiT | None = None,
    text_dropout: float = 0.1,
    fg_weight: float = 3.0,
    ema: float = 0.0,
    on_step=None,
) -> tuple[CausalDiT, list[dict]]:
    """The bidirectional teacher, from scratch or continued from ``init`` (at ``init``'s size).

    text_dropout: fraction of samples trained without text (for classifier-free guidance in DMD).
    fg_weight: extra loss weight on the shape's latent cells (``foreground_weight``); 0 = plain MSE.
    ema: > 0 returns the moving average of the weights with this decay (e.g. 0.999).
    """

    def loss(m, x, text, rng):
        return teacher_loss(m, x, text, rng, cfg.stream.shift, text_dropout, fg_weight)

    return _train_dit(
        cfg,
        data,
        loss,
        init=init,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        max_seconds=max_seconds,
        warmup=100,
        on_step=on_step,
        ema=ema,
    )


@torch.no_grad()
def sample_teacher(
    model: CausalDiT,
    text: torch.Tensor,
    shape: tuple,
    *,
    steps: int = 24,
    guidance: float = 0.0,
    shift: float = 5.0,
    seed: int = 0,
) -> torch.Tensor:
    """Bidirectional samples of a teacher: Euler on the flow ODE from sigma 1 to 0 over the shift-warped
    schedule, with classifier-free guidance against no text when ``guidance`` > 0
    (v = v_cond + guidance (v_cond - v_uncond)). text [B, L, D]; shape (F, C, H, W) -> latents [B, F, C, H, W]."""
    return teacher_ode(model, text, shape, steps=steps, guidance=guidance, shift=shift, seed=seed)[0]


@torch.no_grad()
def teacher_ode(
    model: CausalDiT,
    text: torch.Tensor,
    shape: tuple,
    *,
    steps: int = 24,
    guidance: float = 0.0,
    shift: float = 5.0,
    seed: int = 0,
    record: tuple[float, ...] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``sample_teacher``'s ODE, also returning the path at the noise levels ``record`` (added to the
    Euler grid where it lacks them) -> (endpoint [B, F, C, H, W], [x at each recorded sigma])."""
    b = text.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, *shape), generator=gen)
    sig = shift_sigma(np.linspace(1.0, 0.0, steps + 1), shift).tolist()
    for r in record:
        if not 0.0 < r <= 1.0:
            raise InputError(f"recorded noise levels must lie in (0, 1], got {r}")
        if min(abs(r - a) for a in sig) > 1e-6:
            sig = sorted([*sig, float(r)], reverse=True)
    path = {}
    for a, c in zip(sig[:-1], sig[1:]):
        for r in record:
            if abs(r - a) <= 1e-6:
                path[r] = x.clone()
        t = torch.full((b, shape[0]), a * 1000.0)
        if guidance > 0:
            v_both = model.forward_full(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, torch.zeros_like(text)])
            )
            v_cond, v_uncond = v_both.chunk(2)
            v = v_cond + guidance * (v_cond - v_uncond)
        else:
            v = model.forward_full(x, t, text)
        x = x + (c - a) * v
    return x, [path[r] for r in record]


@torch.no_grad()
def teacher_ode_pairs(
    teacher: CausalDiT,
    cfg: WorldConfig,
    prompts: list[str],
    num_clips: int,
    *,
    steps: int = 16,
    guidance: float = 1.5,
    batch: int = 8,
    seed: int = 0,
    max_seconds: float | None = None,
    on_step=None,
) -> LatentData:
    """ODE pairs for the causal student (CausVid's ODE initialisation, which Self Forcing's DMD starts
    from): the teacher's CFG samples of whole clips from noise, each with its path at the stream
    sampler's noise levels. Clip i has prompt ``prompts[i % len(prompts)]``; after ``max_seconds`` it
    stops at the end of a batch."""
    if not prompts:
        raise InputError("ODE pairs need at least one prompt")
    if num_clips < 1 or steps < 1:
        raise InputError(f"ODE pairs need --clips >= 1 and --steps >= 1, got {num_clips} and {steps}")
    teacher.eval()
    record = tuple(float(s) for s in cfg.stream.schedule().sigma)
    shape = (cfg.latent_frames, teacher.config.in_dim, *cfg.latent_hw)
    start_time = time.perf_counter()
    ends, paths, names = [], [], []
    for start in range(0, num_clips, batch):
        chosen = [prompts[i % len(prompts)] for i in range(start, min(start + batch, num_clips))]
        text = torch.from_numpy(cfg.text.encode(chosen))
        x0, path = teacher_ode(
            teacher,
            text,
            shape,
            steps=steps,
            guidance=guidance,
            shift=cfg.stream.shift,
            seed=seed + start,
            record=record,
        )
        ends.append(x0)
        paths.append(torch.stack(path, dim=1))
        names += chosen
        if on_step:
            on_step(len(names), {})
        if max_seconds is not None and time.perf_counter() - start_time > max_seconds:
            logger.info("stopping after %d clips: time budget of %.0f s spent", len(names), max_seconds)
            break
    text = torch.from_numpy(cfg.text.encode(names))
    return LatentData(torch.cat(ends), text, names, torch.cat(paths))


def _train_dit(
    cfg: WorldConfig,
    data: LatentData,
    loss,
    *,
    init,
    steps,
    batch,
    lr,
    seed,
    max_seconds,
    warmup,
    on_step,
    ema: float = 0.0,
    draw=None,
) -> tuple[CausalDiT, list[dict]]:
    """AdamW on ``loss(model, latents, text, rng) -> (loss, logs)`` over random batches of ``data``
    (``draw(rng, size) -> (latents, text)``, default ``data.batch``).
    The model has ``init``'s size (e.g. a widened teacher), else ``cfg.dit``'s. ``ema`` > 0: the
    returned weights are the exponential moving average of the trained ones with this decay."""
    model, rng = _start(lambda: CausalDiT(init.config if init is not None else cfg.dit), init, seed)
    draw = draw or data.batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = _warmup_decay(opt, steps, warmup=warmup)
    if not 0.0 <= ema < 1.0:
        raise ConfigError(f"ema must be in [0, 1), got {ema}")
    averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_warm_ema_fn(ema)) if ema > 0 else None

    def step():
        latents, text = draw(rng, batch)
        logs = _step(opt, sched, model, loss(model, latents, text, rng))
        if averaged is not None:
            averaged.update_parameters(model)
        return logs

    history = _loop(steps, max_seconds, on_step, step)
    return (averaged.module if averaged is not None else model).eval(), history


def student_loss(
    model: CausalDiT,
    latents,
    text,
    rng: np.random.Generator,
    settings: StreamSettings,
    sampler_fraction: float = 0.5,
    fg_weight: float = 0.0,
):
    """Teacher-forced causal flow matching through the streaming KV cache.

    The clip is cut into chunks; chunk i is noised (one sigma per chunk and sample) and predicted
    with the clean chunks before it in the cache, exactly as the streamer holds them (sink, window,
    EMA-Sink fold); then its clean latents are written to the cache by the clean-context pass,
    without gradient (as in Self Forcing). A ``sampler_fraction`` of the sigmas are the sampler's
    own steps. Returns (loss, logs).
    """
    b, f = latents.shape[:2]
    c = settings.chunk_frames
    if f % c:
        raise ConfigError(f"clips of {f} latent frames do not split into chunks of {c}")
    sched_sigma = np.array(settings.schedule().sigma)
    rollout = ChunkRollout.for_prompt(model, text, latents.shape, settings)

    def chunk(i):  # teacher forcing: predict the noised data chunk; the data's clean chunk is committed
        x0 = latents[:, i * c : (i + 1) * c]
        sigma = shifted_sigma(rng, b, settings.shift)
        use_sched = rng.random(b) < sampler_fraction
        sigma = np.where(use_sched, sched_sigma[rng.integers(len(sched_sigma), size=b)], sigma)
        sigma = torch.from_numpy(sigma).float().view(b, 1, 1, 1, 1)
        eps = torch.randn_like(x0)
        x_t = (1 - sigma) * x0 + sigma * eps
        t = (sigma.view(b, 1) * 1000).expand(b, c)
        # the cache is updated in place after this chunk: the differentiable forward reads its own copy
        pred = rollout.predict(x_t, t, copy_cache=True)
        return x0, flow_loss(pred, x0, eps, foreground_weight(x_t, fg_weight))  # weight from the input only

    losses = chunk_loop(rollout, f // c, chunk)
    loss = torch.stack(losses).mean()
    return loss, {
        "loss": float(loss.detach()),
        **{f"loss_chunk{i}": float(v.detach()) for i, v in enumerate(losses)},
    }


def ode_student_loss(model: CausalDiT, trajectory, endpoint, text, rng: np.random.Generator, settings):
    """ODE regression through the streaming KV cache (CausVid's ODE initialisation of the causal student).

    trajectory [B, S, F, C, H, W]: the teacher's ODE path at the sampler's S noise levels; endpoint
    [B, F, C, H, W]: where the path ends. Chunk i is taken from the path at one of the sampler's steps
    (drawn per sample), its x0 prediction (x_t - sigma v) regressed on the endpoint's chunk (MSE), and
    the endpoint's chunk committed to the cache, as the stream commits its own clean chunks. The
    regression target is one sample, not the mean of all clips that could have been noised into x_t,
    so a few-step sampler of the student draws the teacher's sharp samples rather than their blur.
    Returns (loss, logs)."""
    b, s, f = trajectory.shape[:3]
    c = settings.chunk_frames
    if f % c:
        raise ConfigError(f"clips of {f} latent frames do not split into chunks of {c}")
    sched = settings.schedule()
    if s != len(sched.sigma):
        raise InputError(
            f"the ODE pairs hold {s} noise levels, the sampler has {len(sched.sigma)} steps: "
            "make the pairs with the stream settings the student is trained for"
        )
    ts = torch.tensor(sched.t, dtype=torch.float32)
    sigmas = torch.tensor(sched.sigma, dtype=torch.float32)
    rollout = ChunkRollout.for_prompt(model, text, endpoint.shape, settings)

    def chunk(i):
        x0 = endpoint[:, i * c : (i + 1) * c]
        k = torch.from_numpy(rng.integers(s, size=b))
        x_t = trajectory[torch.arange(b), k, i * c : (i + 1) * c]
        pred = rollout.predict(x_t, ts[k].view(b, 1).expand(b, c), copy_cache=True)
        x0_pred = x_t - sigmas[k].view(b, 1, 1, 1, 1) * pred
        return x0, ((x0_pred - x0) ** 2).mean()

    losses = chunk_loop(rollout, f // c, chunk)
    loss = torch.stack(losses).mean()
    return loss, {
        "loss": float(loss.detach()),
        **{f"loss_chunk{i}": float(v.detach()) for i, v in enumerate(losses)},
    }


def train_student(
    cfg: WorldConfig,
    data: LatentData,
    teacher: CausalDiT,
    *,
    steps: int,
    batch: int = 8,
    lr: float = 2e-4,
    seed: int = 0,
    max_seconds: float | None = None,
    fg_weight: float = 3.0,
    objective: str = "flow",
    on_step=None,
) -> tuple[CausalDiT, list[dict]]:
    """The causal student, fine-tuned from ``teacher``'s weights (or a student's) on causal chunks.

    objective "flow": teacher-forced flow matching on ``data``'s clips (``student_loss``);
    "ode": regression on the teacher's ODE pairs (``ode_student_loss``; ``data`` from ``teacher_ode_pairs``)."""
    draw = None
    if objective == "flow":

        def loss(m, x, text, rng):
            return student_loss(m, x, text, rng, cfg.stream, fg_weight=fg_weight)

    elif objective == "ode":
        data.ode_batch(np.random.default_rng(0), 1)  # raises a clear error when there is no trajectory

        def draw(rng, size):
            trajectory, endpoint, text = data.ode_batch(rng, size)
            return (trajectory, endpoint), text

        def loss(m, x, text, rng):
            return ode_student_loss(m, *x, text, rng, cfg.stream)

    else:
        raise ConfigError(f"objective must be 'flow' or 'ode', got {objective!r}")

    return _train_dit(
        cfg,
        data,
        loss,
        init=teacher,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        max_seconds=max_seconds,
        warmup=20,
        on_step=on_step,
        draw=draw,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_weights(module: torch.nn.Module, path: str) -> str:
    return model_dir.save_weights(module, path, create_folder=True)


def save_json(obj, path: str) -> str:
    return atomic_write_json(path, obj, create_folder=True)


def vae_config_dict(config: VAEConfig) -> dict:
    return json_ready(dataclasses.asdict(config))


def _check_saved(path: str, what: str, made_by: str) -> None:
    for f in (path, path + ".json"):
        if not os.path.isfile(f):
            raise InputError(
                f"{what} weights {path}: {f} does not exist; give weights written by {made_by} "
                "(the .safetensors file and its .json config beside it)"
            )


def load_vae(path: str) -> WanVAE:
    """A VAE saved by ``save_vae`` (weights + ``<path>.json`` config)."""
    _check_saved(path, "VAE", "rf-world vae")
    with open(path + ".json") as f:
        return WanVAE.from_pretrained(path, VAEConfig(**json.load(f)))


def save_vae(vae: WanVAE, path: str) -> str:
    save_json(vae_config_dict(vae.config), path + ".json")
    return save_weights(vae, path)


def load_dit(path: str) -> CausalDiT:
    """A DiT saved by ``save_dit`` (weights + ``<path>.json`` config)."""
    from rf_runtime.models.dit import load_checkpoint_file

    _check_saved(path, "DiT", "rf-world teacher / student / generator")
    with open(path + ".json") as f:
        cfg = DiTConfig(**json.load(f))
    return CausalDiT.from_state_dict(load_checkpoint_file(path), cfg)


def save_dit(model: CausalDiT, path: str) -> str:
    save_json(model.config.to_dict(), path + ".json")
    return save_weights(model, path)


def write_model_dir(
    path: str, cfg: WorldConfig, dit: CausalDiT, vae: WanVAE, model_card: dict | None = None
) -> str:
    """A model folder (``rf_runtime.model_dir``) of the world model: its stream settings, resolution and
    text encoder in the card."""
    return model_dir.write(
        path,
        dit,
        vae,
        text_encoder=cfg.text.to_dict(),
        stream=cfg.stream,
        resolution=(cfg.height, cfg.width),
        model_card=model_card,
    )
