"""The Wan2.1 causal 3D VAE (SPEC section 4) with an explicit, fixed-shape feature cache.

Key names are those of Wan's ``WanVAE_`` (``encoder.*``, ``decoder.*``, ``conv1.*``, ``conv2.*``),
so ``Wan2.1_VAE.pth`` loads unchanged.

Causal convolutions see the past through a cache of their last 2 input frames. Wan keeps that
cache as a list that starts empty (``None``) and grows; here every slot starts as 2 frames of
zeros, which computes the same numbers (frame 0 sees zero padding either way) and gives every
slot a fixed shape, so the streaming decoder can carry it as explicit tensors (and export it).
Temporal upsampling is the one place where frame 0 is special: latent frame 0 skips ``time_conv``
and gives 1 frame; later frames run it with the cache, which starts from zeros so latent frame 1
never sees frame 0 as temporal context, as in Wan.

Shapes: latents [B, z_dim, F, H, W]; pixels [B, 3, 1 + 4(F-1), 8H, 8W] in [-1, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rf_runtime.errors import CheckpointError, ConfigError, InputError

WAN_LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN_LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
CACHE_T = 2  # frames of past input a causal conv keeps


@dataclass(frozen=True)
class VAEConfig:
    """Defaults = the Wan2.1 VAE (``Wan2.1_VAE.pth``)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN_LATENT_STD

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per downsample), "
                f"got {self.temperal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(f"latents_mean and latents_std need z_dim={self.z_dim} entries each")
        if any(s <= 0 for s in self.latents_std):
            raise ConfigError("latents_std entries must be positive")

    @property
    def stride(self) -> tuple[int, int, int]:
        """(temporal, spatial, spatial) compression: (4, 8, 8) for Wan2.1."""
        s = 2 ** (len(self.dim_mult) - 1)
        return 2 ** sum(bool(t) for t in self.temperal_downsample), s, s


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; ``past`` frames replace that padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x, past=None):
        pad_t = self.time_pad
        if past is not None and pad_t > 0:
            x = torch.cat([past, x], dim=2)
            pad_t -= past.shape[2]
        return super().forward(F.pad(x, (*self.space_pad, pad_t, 0)))


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and gamma."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class FeatureCache:
    """Walks the cache slots of one encoder/decoder call in a fixed order.

    slots: list of tensors (one per cached conv, in call order); empty on the first call, filled
    with zero-initialised fixed-shape tensors as convs are reached. ``first`` marks the call that
    handles frame 0 (temporal resampling treats it specially).
    """

    def __init__(self, slots: list, first: bool):
        self.slots, self.first, self.index = slots, first, 0

    def _slot(self, like: torch.Tensor, frames: int) -> torch.Tensor:
        if self.index == len(self.slots):
            self.slots.append(like.new_zeros((*like.shape[:2], frames, *like.shape[3:])))
        return self.slots[self.index]

    def conv(self, layer: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """A causal conv with the last CACHE_T input frames as its past."""
        past = self._slot(x, CACHE_T)
        history = torch.cat([past, x], dim=2)
        # a copy, not a view: a view would keep the whole history alive (at 480x832 the last stage's
        # 6 frames of [96, 480, 832] for each 2-frame slot: 4.4 GB more per stream); the same numbers
        self.slots[self.index] = history[:, :, -CACHE_T:].clone()
        self.index += 1
        return layer(x, past)

    def time_up(self, layer: CausalConv3d, x: torch.Tensor) -> torch.Tensor | None:
        """time_conv of temporal upsampling; None on frame 0 (which skips it)."""
        self._slot(x, CACHE_T)  # frame 0 still reserves the slot that the later frames' time_conv reads
        if self.first:
            self.index += 1
            return None
        return self.conv(layer, x)

    def time_down(self, layer: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """time_conv of temporal downsampling (stride 2): the first chunk passes through."""
        past = self._slot(x, 1)
        self.slots[self.index] = x[:, :, -1:]
        self.index += 1
        if self.first:
            return x
        return layer(torch.cat([past, x], dim=2))


def _frames_2d(fn, x):
    """Apply a 2D module frame by frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x, cache: FeatureCache):
        if self.mode == "upsample3d":
            y = cache.time_up(self.time_conv, x)
            if y is not None:  # 2C channels -> 2 frames per input frame, interleaved in time
                b, c2, t, h, w = y.shape
                x = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        x = _frames_2d(self.resample, x)
        if self.mode == "downsample3d":
            x = cache.time_down(self.time_conv, x)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache: FeatureCache):
        h = self.shortcut(x)
        for layer in self.residual:
            x = cache.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache: FeatureCache):
        def attend(y):  # [N, C, H, W]
            n, c, h, w = y.shape
            q, k, v = (
                self.to_qkv(self.norm(y)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).chunk(3, dim=-1)
            )
            out = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(n, c, h, w)
            return self.proj(out)

        return x + _frames_2d(attend, x)


def _run(layers, x, cache):
    for layer in layers:
        x = layer(x, cache)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig, out_channels: int):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(
                    Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d")
                )
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, cfg.dropout),
            AttentionBlock(out_dim),
            ResidualBlock(out_dim, out_dim, cfg.dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, out_channels, 3, padding=1)
        )

    def forward(self, x, cache: FeatureCache):
        x = cache.conv(self.conv1, x)
        x = _run(self.middle, _run(self.downsamples, x, cache), cache)
        x = self.head[1](self.head[0](x))
        return cache.conv(self.head[2], x)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):  # the previous upsample halved the channels
                in_dim = in_dim // 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1)
        )

    def forward(self, x, cache: FeatureCache):
        x = cache.conv(self.conv1, x)
        x = _run(self.upsamples, _run(self.middle, x, cache), cache)
        x = self.head[1](self.head[0](x))
        return cache.conv(self.head[2], x)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = config or VAEConfig()
        self.config = cfg
        self.encoder = Encoder3d(cfg, cfg.z_dim * 2)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer(
            "latents_mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False
        )
        self.register_buffer(
            "latents_inv_std", 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False
        )

    @classmethod
    def from_state_dict(cls, state_dict: dict, config: VAEConfig | None = None) -> "WanVAE":
        from rf_runtime.models.dit import check_state_dict

        cfg = config or VAEConfig()
        model = cls(cfg)
        check_state_dict(model, state_dict, what=f"WanVAE({cfg})")
        model.load_state_dict(state_dict, strict=True)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: VAEConfig | None = None) -> "WanVAE":
        """Load ``Wan2.1_VAE.pth`` (or a ``.safetensors`` with the same keys)."""
        from rf_runtime.models.dit import load_checkpoint_file

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"VAE weights {path} not found: pass the path of Wan2.1_VAE.pth")
        return cls.from_state_dict(load_checkpoint_file(path), config)

    def _check(self, x, channels, what):
        if x.ndim != 5 or x.shape[1] != channels:
            raise InputError(f"{what} must be [B, {channels}, F, H, W], got {tuple(x.shape)}")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 1+4k, H, W] in [-1, 1] -> normalised mean latents [B, z_dim, 1+k, H/8, W/8]."""
        mu, _ = self.encode_moments(pixels)
        return (mu - self.latents_mean) * self.latents_inv_std

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, 1+4k, H, W] -> (mu, log_var) of the posterior, each [B, z_dim, 1+k, H/8, W/8],
        before the latent normalisation (training a VAE needs both)."""
        self._check(pixels, 3, "pixels")
        t, step = pixels.shape[2], self.config.stride[0]
        if (t - 1) % step:
            raise InputError(f"pixels need 1 + {step}k frames, got {t}")
        slots: list = []
        outs = [self.encoder(pixels[:, :, :1], FeatureCache(slots, first=True))]
        for i in range(1, 1 + (t - 1) // step):  # frames in chunks of 1, 4, 4, ...
            outs.append(
                self.encoder(
                    pixels[:, :, 1 + step * (i - 1) : 1 + step * i], FeatureCache(slots, first=False)
                )
            )
        mu, log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        return mu, log_var

    def decode_step(self, z: torch.Tensor, slots: list, first: bool) -> torch.Tensor:
        """Decode ONE latent frame z [B, z_dim, 1, H, W] (normalised space) with the feature cache
        ``slots`` (updated in place; fixed shapes once created). -> [B, 3, 1 or 4, 8H, 8W], unclamped."""
        x = self.conv2(z / self.latents_inv_std + self.latents_mean)
        return self.decoder(x, FeatureCache(slots, first))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, z_dim, F, H, W] -> pixels [B, 3, 1 + 4(F-1), 8H, 8W] clamped to [-1, 1]."""
        self._check(latents, self.config.z_dim, "latents")
        return self.stream_decoder(latents.shape[0]).decode_chunk(latents)

    def stream_decoder(self, batch_size: int = 1) -> "VAEStreamDecoder":
        return VAEStreamDecoder(self, batch_size)


class VAEStreamDecoder:
    """Decodes a stream chunk by chunk, carrying the causal feature cache between chunks.

    The first chunk of f latent frames gives 1 + 4(f-1) frames, later chunks 4f.
    """

    def __init__(self, vae: WanVAE, batch_size: int = 1):
        self.vae, self.batch_size = vae, batch_size
        self.reset()

    def reset(self) -> None:
        self.slots: list = []
        self.frames_decoded = 0

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        self.vae._check(latents, self.vae.config.z_dim, "latents")
        if latents.shape[0] != self.batch_size:
            raise InputError(f"this decoder was made for batch {self.batch_size}, got {latents.shape[0]}")
        outs = []
        for i in range(latents.shape[2]):
            outs.append(
                self.vae.decode_step(latents[:, :, i : i + 1], self.slots, first=self.frames_decoded == 0)
            )
            self.frames_decoded += 1
        return torch.cat(outs, dim=2).clamp_(-1, 1)
