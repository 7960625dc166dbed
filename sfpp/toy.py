"""The toy world's latent space: a fixed, lossless pixel <-> latent transform (no autoencoder to train).

Each latent frame is one video frame whose 4x4 pixel blocks are folded into channels (pixel-unshuffle: 3 colours x
16 pixels = 48 channels) and standardised per colour, so the DiT sees unit-scale latents at 1/4 the resolution, as it
would see Wan VAE latents at 1/8. Decoding is the exact inverse: whatever the DiT gets wrong shows in the pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


class PixelShuffleCodec:
    temporal_factor = 1

    def __init__(self, factor: int = 4, mean: tuple[float, ...] = (0.0,) * 3, std: tuple[float, ...] = (1.0,) * 3):
        self.spatial_factor = factor
        self.channels = 3 * factor * factor
        self.mean, self.std = tuple(mean), tuple(std)

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=device)[None, None, :, None, None]
        std = torch.tensor(self.std, device=device)[None, None, :, None, None]
        return mean, std

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> latents [B, 3*f*f, T, H/f, W/f]."""
        mean, std = self._stats(video.device)
        z = F.pixel_unshuffle(((video - mean) / std).flatten(0, 1), self.spatial_factor)
        return z.unflatten(0, video.shape[:2]).transpose(1, 2)

    def decode_pixels(self, z: Tensor) -> Tensor:
        """latents [B, C, T, h, w] -> video [B, T, 3, H, W], unclamped."""
        mean, std = self._stats(z.device)
        video = F.pixel_shuffle(z.float().transpose(1, 2).flatten(0, 1), self.spatial_factor)
        return video.unflatten(0, (z.shape[0], z.shape[2])) * std + mean

    def decode_frames(self, z: Tensor) -> Tensor:
        """latents [B, C, T, h, w] -> uint8 frames [B, T, H, W, 3]."""
        video = self.decode_pixels(z).clamp(-1, 1)
        return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)

    def stream(self) -> _Stream:
        return _Stream(self)

    def to_meta(self) -> dict:
        return {"type": "pixel-shuffle", "factor": self.spatial_factor, "mean": self.mean, "std": self.std}

    def save(self, directory: Path) -> None:
        pass  # fully described by its metadata

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> PixelShuffleCodec:
        return cls(meta["factor"], meta["mean"], meta["std"])


class _Stream:
    def __init__(self, codec: PixelShuffleCodec) -> None:
        self.codec = codec

    def decode(self, z: Tensor) -> Tensor:
        return self.codec.decode_frames(z)  # frames are independent: nothing to carry between chunks
