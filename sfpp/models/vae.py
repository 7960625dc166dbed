"""Wan2.1 VAE: causal 3D encoder/decoder with Wan's parameter names, and a streaming decoder.

Geometry: 8x spatial and 4x temporal compression, 16 latent channels normalised per channel by Wan's mean/std.
Every temporal convolution is causal, so a video can be decoded chunk by chunk: each causal convolution keeps the
last frames of its input (its "feature cache") and prepends them to the next chunk. Decoding latents in any chunks
equals decoding them at once; the first latent frame decodes to 1 video frame, every later one to 4.

Parameter names follow `Wan2.1_VAE.pth` (`encoder.downsamples.3.residual.2.weight`, `decoder.upsamples.3.time_conv`,
`conv1`/`conv2` for the latent projections) so that file loads as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Wan2.1's per-channel latent statistics: z_normalised = (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Per-module feature caches of one encode or decode stream, keyed by module: the last input frames of each causal
# convolution, and the "past the first chunk" state of each temporal resample.
FeatureCache = dict[nn.Module, Tensor]


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampling ({len(self.dim_mult) - 1}), "
                f"got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries each")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_dict(cls, d: dict) -> WanVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WanVAEConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------- layers


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time. With a cache it takes its left context from the previous chunk
    (zeros before the first), so chunked and whole-video outputs are equal."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])  # height/width padding stays with the convolution

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:  # [B, C, T, H, W]
        if self.time_pad:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                prev = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([prev, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad :].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(dim) and a per-channel gain `gamma`."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=1).type_as(x) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
        q, k, v = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B*T, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).unflatten(2, (h, w))
        y = self.proj(y).unflatten(0, (b, t)).transpose(1, 2)
        return x + y


class Upsample(nn.Upsample):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """2x spatial up/down-sampling per frame, and for the "3d" modes 2x in time through a causal `time_conv`."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def _upsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        # The first latent frame of a video stays one frame; every later frame becomes two (the two channel halves
        # of time_conv's output), the first of them seeing zeros as its past.
        first = self not in cache
        cache[self] = x.new_ones(())  # marks "past the first chunk"
        head, x = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return torch.cat([head, x], dim=2) if first else x

    def _downsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        # Frame 0 passes through; then each pair of frames is reduced with the last frame of the previous chunk.
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        return x if prev is None else self.time_conv(torch.cat([prev, x], dim=2))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:  # [B, C, T, H, W]
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, t = x.shape[0], x.shape[2]
        x = self.resample(x.transpose(1, 2).flatten(0, 1))  # per frame: [B*T, C', H', W']
        x = x.unflatten(0, (b, t)).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


def _run(layers: nn.Sequential, x: Tensor, cache: FeatureCache) -> Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)
        )

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # each upsampling halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


# ----------------------------------------------------------------------------------------------- the VAE


class WanVAE(nn.Module):
    """Wan2.1's video VAE. Also a pipeline decoder part ("wan-vae"): `stream()` decodes chunk by chunk."""

    WEIGHTS = "vae.safetensors"

    def __init__(self, cfg: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or WanVAEConfig()
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # encoder output -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # latent -> decoder input
        self.decoder = Decoder3d(cfg)
        self._stats: dict[torch.device, Tensor] = {}  # fp32 (mean, std) per device, whatever the VAE's dtype
        # Latent frames per decoder call in the pipeline's streams (None: a whole chunk): 1 holds a third of the
        # activations of a 3-frame chunk and gives the same frames (`Pipeline.fit_memory` sets it when memory is short).
        self.frames_per_call: int | None = None

    # --- the pipeline's decoder interface

    @property
    def channels(self) -> int:
        return self.cfg.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.cfg.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.cfg.spatial_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def to_meta(self) -> dict:
        return {"type": "wan-vae", "config": asdict(self.cfg)}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(Path(directory) / self.WEIGHTS))

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> WanVAE:
        return cls.from_file(
            Path(directory) / meta.get("file", cls.WEIGHTS), WanVAEConfig.from_dict(meta.get("config", {}))
        )

    @classmethod
    def from_file(cls, path: str | Path, cfg: WanVAEConfig | None = None) -> WanVAE:
        """Load `Wan2.1_VAE.pth` (or our .safetensors) onto a meta-device model: no second copy in memory."""
        from sfpp.models.checkpoint import load_file, load_weights

        with torch.device("meta"):
            vae = cls(cfg)
        load_weights(vae, load_file(path), source=str(path))
        return vae.eval()

    def latent_stats(self, device: torch.device) -> Tensor:
        """Wan's per-channel latent mean and std, fp32 [2, 1, z, 1, 1, 1] on `device`."""
        if device not in self._stats:
            stats = torch.tensor([self.cfg.latents_mean, self.cfg.latents_std], dtype=torch.float32, device="cpu")
            self._stats[device] = stats.view(2, 1, self.cfg.z_dim, 1, 1, 1).to(device)
        return self._stats[device]

    def stream(self, *, frames_per_call: int | None = None) -> VAEStream:
        return VAEStream(self, frames_per_call=frames_per_call or self.frames_per_call)

    # --- whole videos

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent means [B, z, 1 + k, H/8, W/8], in fp32.

        As in Wan, the encoder sees the first frame alone and then 4 frames at a time."""
        tf, sf = self.temporal_factor, self.spatial_factor
        if (
            video.ndim != 5
            or video.shape[1] != 3
            or (video.shape[2] - 1) % tf
            or video.shape[3] % sf
            or video.shape[4] % sf
        ):
            raise ValueError(
                f"video must be [batch, 3, 1 + {tf}k, H, W] with H, W multiples of {sf}, got {tuple(video.shape)}"
            )
        cache: FeatureCache = {}
        x = video.to(self.dtype)
        chunks = [x[:, :, :1], *x[:, :, 1:].split(tf, dim=2)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(out).chunk(2, dim=1)[0].float()
        mean, std = self.latent_stats(mu.device)
        return (mu - mean) / std

    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 frames [B, 1 + 4k, H, W, 3] (the pipeline's format) -> normalised latents [B, z, 1 + k, H/8, W/8]."""
        return self.encode(frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, z, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1], fp32."""
        return self.stream().decode_pixels(z)


class VAEStream:
    """Decodes one video's latents chunk by chunk, keeping every causal convolution's feature cache in between."""

    def __init__(self, vae: WanVAE, *, frames_per_call: int | None = None) -> None:
        self.vae = vae
        self.frames_per_call = frames_per_call  # latent frames per decoder call (less memory, same result)
        self.cache: FeatureCache = {}

    @torch.no_grad()
    def decode_pixels(self, z: Tensor) -> Tensor:
        """Next latents [B, z, f, h, w] (normalised) -> their video frames [B, 3, n, 8h, 8w] in [-1, 1], fp32:
        n = 1 + 4(f - 1) for the first chunk of a video and 4f after it."""
        vae = self.vae
        if z.ndim != 5 or z.shape[1] != vae.channels:
            raise ValueError(f"latents must be [batch, {vae.channels}, frames, h, w], got {tuple(z.shape)}")
        mean, std = vae.latent_stats(z.device)
        x = vae.conv2((z.float() * std + mean).to(vae.dtype))
        parts = x.split(self.frames_per_call or x.shape[2], dim=2)
        out = torch.cat([vae.decoder(part, self.cache) for part in parts], dim=2)
        return out.float().clamp_(-1, 1)

    def decode(self, z: Tensor) -> Tensor:
        """Next latents -> uint8 frames [B, n, H, W, 3], the pipeline's format."""
        pixels = self.decode_pixels(z).add_(1).mul_(127.5).round_().to(torch.uint8)
        return pixels.permute(0, 2, 3, 4, 1)
