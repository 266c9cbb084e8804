"""The Re-DMD trainer: the student's Self-Forcing rollouts, the reward, the DMD and critic updates.

One training step (the release's loop, ``trainer/rewarded_distillation.py``):

    if step % critic_updates_per_generator == 0:       # generator update (every 5th step)
        x0  = student rollout, gradient at the shared exit step
        r   = reward(decode(x0), prompts)              # no gradient
        w   = exp(r / beta) / Z
        L   = Re-DMD generator loss(x0, DMD gradient(teacher, critic), w)  -> AdamW step, EMA update
    x0 = student rollout without gradient              # critic update (every step)
    L  = critic flow-matching loss on x0               -> AdamW step

Randomness. Every random draw is a function of (seed, step, phase, global sample index): prompt
choice and exit step from a generator every rank seeds alike, noise and DMD timesteps from one
generator per sample. So a run resumed from a checkpoint continues bit for bit, and N processes
with a global batch B draw exactly what one process with batch B draws.

Precision: bf16 autocast on CUDA, fp32 on CPU; parameters, optimiser states and the EMA in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from typing import Callable, Iterator

try:
    import torch
except ImportError as _exc:  # rf_runtime.train needs torch: one line naming the extra
    from rf_runtime.errors import missing_extra

    raise missing_extra(_exc) from None

from rf_runtime.errors import CheckpointError, ConfigError, OutputError
from rf_runtime.files import atomic_path
from rf_runtime.schema import require_finite
from rf_runtime.sampler import StreamSettings
from rf_runtime.train import distributed as D
from rf_runtime.train.config import TrainConfig
from rf_runtime.train.dmd import (
    DMDSettings,
    critic_loss,
    dmd_gradient,
    generator_loss,
    reward_weights,
    sample_timesteps,
    sigma_of,
)
from rf_runtime.train.rollout import sample_exit_step, self_forcing_rollout, training_settings

logger = logging.getLogger("rf_runtime")

CHECKPOINT_FORMAT = "rf_runtime.train/1"
_CKPT_NAME = re.compile(r"^checkpoint_(\d+)\.safetensors$")
GENERATOR, CRITIC, EVAL = 0, 1, 2  # phases, part of the random seeds


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"the prompt file {path} has no prompts: write one prompt per line")
    return prompts


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, phase, index), stable across runs and machines."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h * 0x100000001B3 ^ (int(p) + 0x9E3779B97F4A7C15)) & 0x7FFFFFFFFFFFFFFF
    return h


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _mean_logs(logs: list[dict]) -> dict:
    """Average each logged tensor over the micro-batches (they have equal sizes)."""
    return {
        k: torch.stack([torch.as_tensor(x[k]).detach().float().cpu() for x in logs]).mean() for k in logs[0]
    }


def latest_checkpoint(output_dir: str) -> str | None:
    """The checkpoint with the highest step in ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CKPT_NAME.match(name))]
    return os.path.join(output_dir, max(found)[1]) if found else None


@dataclasses.dataclass
class StepLog:
    step: int
    values: dict


class Trainer:
    """Loads the models a ``TrainConfig`` names and trains the student with Re-DMD.

    ``train()`` yields a ``StepLog`` after every step (the CLI draws its progress bar from it).
    """

    def __init__(self, config: TrainConfig, ctx: D.DistContext | None = None, reward_model=None):
        from rf_runtime import model_dir

        self.config = cfg = config
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "device is 'cuda' but no CUDA GPU is visible to torch: set device to 'cpu' or 'auto', "
                "or install a CUDA build of torch"
            )
        self.ctx = ctx or D.DistContext(
            device=torch.device(
                "cuda"
                if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()))
                else "cpu"
            )
        )
        if cfg.batch_size % self.ctx.world_size:
            raise ConfigError(
                f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                f"({self.ctx.world_size}): each process takes an equal share of the global batch"
            )
        if cfg.cpu_threads and self.ctx.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.device = self.ctx.device
        self.autocast = self.device.type == "cuda"
        self.local_batch = cfg.batch_size // self.ctx.world_size
        if cfg.micro_batch_size and self.local_batch % cfg.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size ({cfg.micro_batch_size}) must divide the batch of each process "
                f"(batch_size {cfg.batch_size} / {self.ctx.world_size} processes = {self.local_batch})"
            )
        self.step = 0
        self._stop = threading.Event()  # request_stop(): finish the step, save, stop

        student_dir = cfg.student or cfg.teacher
        card = model_dir.read_card(student_dir)
        self.stream = self._stream_settings(card)
        if cfg.num_frames % self.stream.chunk_frames:
            raise ConfigError(
                f"num_frames ({cfg.num_frames}) must be a multiple of chunk_frames "
                f"({self.stream.chunk_frames}): rollouts are made of whole chunks"
            )
        self.rollout_settings = training_settings(self.stream, cfg.fold_in_training)
        self.dmd = DMDSettings(
            cfg.dmd.guidance_scale, cfg.dmd.timestep_shift, cfg.dmd.min_timestep, cfg.dmd.max_timestep
        )

        # --- models -------------------------------------------------------------------------
        # the frozen teacher is stored in bf16 on GPUs (it only runs under bf16 autocast there)
        teacher_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.teacher = (
            model_dir.load_dit(cfg.teacher).to(self.device, teacher_dtype).eval().requires_grad_(False)
        )
        self.critic = model_dir.load_dit(cfg.critic or cfg.teacher).to(self.device).eval()
        self.student = model_dir.load_dit(student_dir, cfg.student_checkpoint).to(self.device).eval()
        for name, m in (("critic", self.critic), ("student", self.student)):
            if (
                m.config.text_dim != self.teacher.config.text_dim
                or m.config.in_dim != self.teacher.config.in_dim
            ):
                raise ConfigError(
                    f"the {name} and the teacher differ in text_dim or latent channels: they must share "
                    "the text encoder and the VAE"
                )
        self.vae = model_dir.load_vae(student_dir, card).to(self.device).eval().requires_grad_(False)
        if self.autocast and card.get("text_encoder", {}).get("kind", "umt5") == "umt5":
            # umT5-XXL runs every step on the prompts: keep it on the GPU, in bf16 (~11 GB)
            self.text_encoder = model_dir.load_text_encoder(
                student_dir, card, device=str(self.device), dtype="bfloat16"
            )
        else:
            self.text_encoder = model_dir.load_text_encoder(student_dir, card)
        h, w = cfg.resolution or model_dir.resolution(card)
        self.latent_hw = model_dir.latent_hw_for(
            h, w, self.vae.config.stride[1], self.student.config.patch_size[1:]
        )
        self.prompts = read_prompts(cfg.prompts)
        self.reward_model = reward_model if reward_model is not None else self._reward_model()

        if cfg.activation_checkpointing:
            D.checkpoint_blocks(self.student)
            D.checkpoint_blocks(self.critic)
        for model in (self.teacher, self.critic, self.student):
            D.shard(model, self.ctx)
        self.gen_params = [(n, p) for n, p in self.student.named_parameters()]
        self.critic_params = [(n, p) for n, p in self.critic.named_parameters()]
        o = cfg.optim
        self.gen_opt = torch.optim.AdamW(
            [p for _, p in self.gen_params], lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
        )
        self.critic_opt = torch.optim.AdamW(
            [p for _, p in self.critic_params], lr=o.critic_lr, betas=o.betas, weight_decay=o.weight_decay
        )
        self.ema = [p.detach().clone() for _, p in self.gen_params] if o.ema_weight > 0 else None
        with torch.no_grad():
            self.uncond = self._encode([cfg.negative_prompt]) if cfg.negative_prompt else None

    # ---- setup helpers -------------------------------------------------------------------

    def _stream_settings(self, card: dict) -> StreamSettings:
        base = dict(card.get("stream", {}))
        base.update({k: v for k, v in dataclasses.asdict(self.config.stream).items() if v is not None})
        return StreamSettings(**base)

    def _reward_model(self):
        from rf_runtime.train.rewards import MotionReward, VideoAlignReward

        r = self.config.reward
        if r.kind == "motion":
            return MotionReward(r.motion.mean, r.motion.std, r.motion.flicker_weight)
        if r.kind == "videoalign":
            dtype = torch.bfloat16 if self.autocast else torch.float32
            return VideoAlignReward(
                r.videoalign.model_dir,
                output=r.videoalign.output,
                device=str(self.device),
                dtype=dtype,
                pixel_range=r.videoalign.pixel_range,
            )
        return None

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.text_encoder.encode(prompts)).to(self.device, torch.float32)

    # ---- one step ------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def _draws(self, phase: int, step: int | None = None):
        """This rank's share of the global batch: prompts, text, noise, exit step, DMD t / eps."""
        cfg, s = self.config, self.stream
        step = self.step if step is None else step
        shared = _generator(cfg.seed, step, phase, -1)
        picks = torch.randint(len(self.prompts), (cfg.batch_size,), generator=shared).tolist()
        exit_step = sample_exit_step(s.num_steps, shared)
        first = self.ctx.rank * self.local_batch
        index = range(first, first + self.local_batch)
        shape = (cfg.num_frames, self.student.config.in_dim, *self.latent_hw)
        noise, renoise, t, eps = [], [], [], []
        for j in index:
            g = _generator(cfg.seed, step, phase, j)
            noise.append(torch.randn(shape, generator=g))
            renoise.append(torch.randn((s.num_steps - 1, *shape), generator=g))
            t.append(sample_timesteps(1, self.dmd, g))
            eps.append(torch.randn(shape, generator=g))
        prompts = [self.prompts[picks[j]] for j in index]
        dev = self.device
        return dict(
            prompts=prompts,
            text=self._encode(prompts),
            exit_step=exit_step,
            noise=torch.stack(noise).to(dev),
            renoise=torch.stack(renoise, dim=1).to(dev),
            t=torch.cat(t).to(dev),
            eps=torch.stack(eps).to(dev),
        )

    def _uncond(self, text: torch.Tensor) -> torch.Tensor:
        if self.uncond is None:
            return torch.zeros_like(text)
        pad = text.shape[1] - self.uncond.shape[1]
        u = torch.nn.functional.pad(self.uncond, (0, 0, 0, max(pad, 0)))
        return u.expand(text.shape[0], -1, -1)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [b, F, C, H, W] -> frames [b, T, 3, H', W'] in [0, 1] (clamp(x * 0.5 + 0.5, 0, 1))."""
        with self._autocast():
            pixels = self.vae.decode(x0.detach().transpose(1, 2).to(torch.float32))  # [b, 3, T, H', W']
        return (pixels.float() * 0.5 + 0.5).clamp(0, 1).transpose(1, 2)

    def _rewards(self, x0: torch.Tensor, prompts: list[str]):
        """Decode the clip and score it -> (w [b] or None, the rewards of all ranks' samples).

        With ``reward.normalize``, Z is the mean of exp(r / beta) over this (micro-)batch on all ranks."""
        r = self.config.reward
        if self.reward_model is None:
            return None, None
        reward = self.reward_model(self.decode(x0), prompts).to(self.device)
        everyone = D.all_gather_cat(reward, self.ctx)
        z = torch.exp(everyone.double() / r.beta).mean() if r.normalize else None
        w, _ = reward_weights(reward, r.beta, r.normalize, z)
        return w, everyone

    def _micro_batches(self) -> list[slice]:
        """The local batch in micro-batches of ``micro_batch_size`` (gradient accumulation)."""
        size = self.config.micro_batch_size or self.local_batch
        return [slice(i, i + size) for i in range(0, self.local_batch, size)]

    @staticmethod
    def _part(d: dict, sl: slice) -> dict:
        out = dict(d, prompts=d["prompts"][sl], renoise=d["renoise"][:, sl])
        for key in ("text", "noise", "t", "eps"):
            out[key] = d[key][sl]
        return out

    def _clip_and_step(self, params, opt) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], self.config.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return D.full_tensor(norm) if hasattr(norm, "full_tensor") else norm.detach()

    def generator_step(self) -> dict:
        """Rollout with gradient -> reward -> DMD gradient -> Re-DMD loss; gradients accumulated over
        the micro-batches, then one AdamW step and the EMA update."""
        draws = self._draws(GENERATOR)
        critic_score = lambda x, t, text: self.critic.forward_full(x, t, text)
        teacher_score = lambda x, t, text: self.teacher.forward_full(x, t, text)
        logs, rewards = [], []
        for sl in self._micro_batches():
            d = self._part(draws, sl)
            with self._autocast():
                x0 = self_forcing_rollout(
                    self.student,
                    d["text"],
                    d["noise"],
                    d["renoise"],
                    self.rollout_settings,
                    d["exit_step"],
                    with_grad=True,
                )
                w, everyone = self._rewards(x0, d["prompts"])
                sigma = sigma_of(d["t"], self.dmd)
                grad, glogs = dmd_gradient(
                    x0,
                    d["t"],
                    sigma,
                    d["eps"],
                    teacher_score,
                    critic_score,
                    d["text"],
                    self._uncond(d["text"]),
                    self.dmd.guidance_scale,
                )
                loss, llogs = generator_loss(x0, grad, w)
            (loss * (x0.shape[0] / self.local_batch)).backward()
            logs.append({**glogs, **llogs})
            if everyone is not None:
                rewards.append(everyone)
        out = _mean_logs(logs)
        if rewards:  # statistics over the whole global batch, so that reward hacking shows
            r = self.config.reward
            out.update(reward_weights(torch.cat(rewards), r.beta, r.normalize)[1])
        out["generator_grad_norm"] = self._clip_and_step(self.gen_params, self.gen_opt)
        self._update_ema()
        out["exit_step"] = draws["exit_step"]
        return out

    def critic_step(self) -> dict:
        """Rollout without gradient -> critic flow-matching loss; accumulated over micro-batches."""
        draws = self._draws(CRITIC)
        score = lambda x, t, text: self.critic.forward_full(x, t, text)
        logs = []
        for sl in self._micro_batches():
            d = self._part(draws, sl)
            with self._autocast():
                x0 = self_forcing_rollout(
                    self.student,
                    d["text"],
                    d["noise"],
                    d["renoise"],
                    self.rollout_settings,
                    d["exit_step"],
                    with_grad=False,
                )
                loss, clogs = critic_loss(score, x0, d["t"], sigma_of(d["t"], self.dmd), d["eps"], d["text"])
            (loss * (x0.shape[0] / self.local_batch)).backward()
            logs.append(clogs)
        out = _mean_logs(logs)
        out["critic_grad_norm"] = self._clip_and_step(self.critic_params, self.critic_opt)
        return out

    @torch.no_grad()
    def evaluate_critic(self, batches: int = 4) -> float:
        """The critic loss on fixed held-out draws (the same noise, prompts and timesteps every call),
        averaged over ``batches`` global batches: a noise-free measure of the critic's progress."""
        total = 0.0
        for b in range(batches):
            d = self._draws(EVAL, step=b)
            with self._autocast():
                x0 = self_forcing_rollout(
                    self.student,
                    d["text"],
                    d["noise"],
                    d["renoise"],
                    self.rollout_settings,
                    d["exit_step"],
                    with_grad=False,
                )
                score = lambda x, t, text: self.critic.forward_full(x, t, text)
                loss, _ = critic_loss(score, x0, d["t"], sigma_of(d["t"], self.dmd), d["eps"], d["text"])
            total += float(D.all_reduce_sum(loss.detach().float().clone(), self.ctx)) / self.ctx.world_size
        return total / batches

    @torch.no_grad()
    def reward_statistics(self, batches: int = 4) -> dict:
        """Mean / std / min / max of the reward on the current student's samples (fixed held-out
        draws, full denoising), to set a reward's normalisation (e.g. ``reward.motion.mean/std``)."""
        if self.reward_model is None:
            raise ConfigError("reward.kind is 'none': there is no reward to measure")
        settings = self.rollout_settings
        rewards = []
        for b in range(batches):
            d = self._draws(EVAL, step=b)
            with self._autocast():
                x0 = self_forcing_rollout(
                    self.student,
                    d["text"],
                    d["noise"],
                    d["renoise"],
                    settings,
                    settings.num_steps - 1,
                    with_grad=False,
                )
            reward = self.reward_model(self.decode(x0), d["prompts"]).to(self.device)
            rewards.append(D.all_gather_cat(reward, self.ctx))
        r = torch.cat(rewards).double()
        return {
            "mean": float(r.mean()),
            "std": float(r.std(unbiased=False)),
            "min": float(r.min()),
            "max": float(r.max()),
            "samples": int(r.numel()),
        }

    @torch.no_grad()
    def _update_ema(self):
        if self.ema is None:
            return
        o = self.config.optim
        decay = o.ema_weight if self.step >= o.ema_start_step else 0.0
        for e, (_, p) in zip(self.ema, self.gen_params):
            e.lerp_(p.detach(), 1.0 - decay)

    def train_step(self) -> dict:
        """One step: a generator update every ``critic_updates_per_generator`` steps, then a critic update."""
        logs = {}
        if self.step % self.config.optim.critic_updates_per_generator == 0:
            logs.update(self.generator_step())
        logs.update(self.critic_step())
        self.step += 1
        out = {}
        for k, v in logs.items():  # to plain numbers, averaged over ranks where they are per rank
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(-1).mean()
                if k in ("generator_loss", "dmd_loss", "critic_loss", "dmd_grad_abs_mean"):
                    v = D.all_reduce_sum(v.to(self.device).clone(), self.ctx).cpu() / self.ctx.world_size
                v = float(v)
            out[k] = v
        return out

    def request_stop(self) -> None:
        """Ask ``train()`` to stop at the next step boundary: the step under way completes (critic and
        generator updates, EMA, log), a checkpoint of that state is written, and ``train()`` returns.
        Safe to call from a signal handler or another thread; ``stopped`` is True afterwards."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _stop_agreed(self) -> bool:
        """Whether to stop before the next step; under several processes all agree (a stop on any rank
        stops every rank at the same step, so that the collective checkpoint is one state)."""
        if not self.ctx.distributed:
            return self._stop.is_set()
        flag = torch.tensor([1.0 if self._stop.is_set() else 0.0], device=self.device)
        stop = float(D.all_reduce_sum(flag, self.ctx)) > 0
        if stop:
            self._stop.set()
        return stop

    def train(
        self, steps: int | None = None, on_checkpoint: Callable[[str], None] | None = None
    ) -> Iterator[StepLog]:
        """Train until ``steps`` (default: the config's) and yield a log record after each step.

        Writes a checkpoint every ``checkpoint_every`` steps and at the end, and appends every
        ``log_every``-th record to ``output_dir/log.jsonl`` (main process only). After
        ``request_stop()`` it stops at the next step boundary and writes a checkpoint there."""
        cfg = self.config
        end = cfg.steps if steps is None else steps
        if self.ctx.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
        saved_at = None
        while self.step < end and not self._stop_agreed():
            start = time.perf_counter()
            values = self.train_step()
            values["seconds"] = time.perf_counter() - start
            if self.ctx.is_main and (self.step % cfg.log_every == 0 or self.step == end):
                with open(os.path.join(cfg.output_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"step": self.step, **values}) + "\n")
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                path = self.save_checkpoint()
                saved_at = self.step
                if on_checkpoint:
                    on_checkpoint(path)
            yield StepLog(self.step, values)
        if self._stop.is_set() and saved_at != self.step:  # stopped at a step boundary: save that state
            path = self.save_checkpoint()
            if on_checkpoint:
                on_checkpoint(path)

    # ---- checkpoints ---------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint holds, as full CPU tensors (collective under FSDP)."""
        out = {}
        for prefix, params in (("generator", self.gen_params), ("critic", self.critic_params)):
            for n, p in params:
                out[f"{prefix}.{n}"] = D.full_tensor(p).float().contiguous()
        if self.ema is not None:
            for e, (n, _) in zip(self.ema, self.gen_params):
                out[f"generator_ema.{n}"] = D.full_tensor(e).float().contiguous()
        for prefix, opt, params in (
            ("optim.generator", self.gen_opt, self.gen_params),
            ("optim.critic", self.critic_opt, self.critic_params),
        ):
            for n, p in params:
                for key, value in opt.state.get(p, {}).items():
                    out[f"{prefix}.{n}.{key}"] = D.full_tensor(value).contiguous()
        out["rng.torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            out["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the checkpoint atomically (temporary name, then rename); returns its path.

        Under FSDP every rank takes part (the shards are gathered) and rank 0 writes."""
        from safetensors.torch import save_file

        cfg = self.config
        path = path or os.path.join(cfg.output_dir, f"checkpoint_{self.step:06d}.safetensors")
        tensors = self.state_tensors()
        if self.ctx.is_main:
            meta = {
                "format": CHECKPOINT_FORMAT,
                "step": str(self.step),
                "config": json.dumps(cfg.to_dict()),
                "world_size": str(self.ctx.world_size),
            }
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with atomic_path(path, "the checkpoint") as tmp:
                try:
                    save_file(tensors, tmp, metadata=meta)
                except Exception as exc:  # safetensors' own error type, e.g. for a full disk
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise OutputError(
                        f"could not write the checkpoint {path} ({reason}): free some space or set "
                        "output_dir to another folder; nothing was written there"
                    ) from exc
            self._prune_checkpoints()
            logger.info("wrote checkpoint %s (step %d)", path, self.step)
        D.barrier(self.ctx)
        return path

    def _prune_checkpoints(self):
        keep = self.config.keep_checkpoints
        if keep <= 0:
            return
        d = self.config.output_dir
        found = sorted((int(m.group(1)), name) for name in os.listdir(d) if (m := _CKPT_NAME.match(name)))
        for _, name in found[:-keep]:
            os.remove(os.path.join(d, name))

    def load_checkpoint(self, path: str):
        """Restore parameters, EMA, optimiser states, RNG states and the step from a checkpoint
        (under FSDP each rank keeps its shard of the full tensors)."""
        from safetensors import safe_open

        if os.path.isdir(path):
            raise CheckpointError(
                f"checkpoint {path} is a directory: pass a checkpoint_*.safetensors file in it, or "
                "--resume without a value for the newest in output_dir"
            )
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            handle = safe_open(path, "pt")
        except Exception as exc:  # safetensors raises its own error type for a file that is not safetensors
            raise CheckpointError(
                f"could not read {path} ({exc}): pass a checkpoint_*.safetensors written by "
                "rf-train, or --resume without a value for the newest in output_dir"
            ) from exc
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"{path} is not an rf-train checkpoint (format {meta.get('format')!r}); "
                    "to start from generator weights, use the config key 'student_checkpoint'"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        require_finite(
            tensors,
            f"checkpoint {path}",
            CheckpointError,
            "a training state must be finite; the file is damaged or the run diverged: resume from an "
            "earlier checkpoint",
        )

        def get(key: str, like: torch.Tensor) -> torch.Tensor:
            """The saved full tensor ``key`` laid out like ``like`` (sharded if ``like`` is)."""
            if key not in tensors:
                raise CheckpointError(f"{path} lacks {key}: it was written for a different model or config")
            value = tensors[key]
            if tuple(value.shape) != tuple(like.shape):
                raise CheckpointError(f"{key}: checkpoint {tuple(value.shape)} != model {tuple(like.shape)}")
            value = value.to(like.device, like.dtype)
            if hasattr(like, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, like.device_mesh, like.placements)
            return value

        with torch.no_grad():
            for prefix, params in (("generator", self.gen_params), ("critic", self.critic_params)):
                for n, p in params:
                    p.copy_(get(f"{prefix}.{n}", p))
            if self.ema is not None:
                for e, (n, _) in zip(self.ema, self.gen_params):
                    e.copy_(get(f"generator_ema.{n}", e))
            for prefix, opt, params in (
                ("optim.generator", self.gen_opt, self.gen_params),
                ("optim.critic", self.critic_opt, self.critic_params),
            ):
                for n, p in params:
                    if f"{prefix}.{n}.step" not in tensors:
                        continue  # no update yet for this parameter
                    # AdamW keeps 'step' as a scalar CPU tensor and the moments shaped like the parameter
                    opt.state[p] = {
                        "step": tensors[f"{prefix}.{n}.step"],
                        "exp_avg": get(f"{prefix}.{n}.exp_avg", p),
                        "exp_avg_sq": get(f"{prefix}.{n}.exp_avg_sq", p),
                    }
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if "rng.torch_cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"], self.device)
        self.step = int(meta["step"])
        logger.info("resumed from %s at step %d", path, self.step)
