"""The toy world's latent space: a fixed linear transform of pixel blocks (no autoencoder to train).

Each latent frame is one video frame. Its f x f pixel blocks (3 f^2 values) are projected onto the top principal
components of the world's blocks, each standardised: 16 components for 4x4 blocks, as many channels as Wan's VAE,
at 1/4 the resolution instead of 1/8. It keeps 98% of the variance (the loss is at the sharpest edges), and it keeps
the DiT's input per token (2x2 latent pixels x 16 = 64 values) well below its width, which a raw 48-channel
pixel-unshuffle (192 values per token) did not: a 128-wide toy DiT could not even represent the noise it had to
remove. Decoding is the exact transpose.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


class PatchPCACodec:
    temporal_factor = 1

    def __init__(self, factor: int, mean: list[float], basis: list[list[float]], scale: list[float]) -> None:
        self.spatial_factor = factor
        self.mean = torch.tensor(mean, dtype=torch.float32)  # [3 f^2]
        self.basis = torch.tensor(basis, dtype=torch.float32)  # [C, 3 f^2], orthonormal rows
        self.scale = torch.tensor(scale, dtype=torch.float32)  # [C]
        self.channels = self.basis.shape[0]
        if self.basis.shape[1] != 3 * factor * factor or self.mean.shape[0] != self.basis.shape[1]:
            raise ValueError(f"basis {tuple(self.basis.shape)} does not fit {factor}x{factor} RGB blocks")

    @classmethod
    def fit(cls, frames: Tensor, factor: int, channels: int, whitening: float = 1.0) -> PatchPCACodec:
        """Principal components of the f x f blocks of frames [N, 3, H, W] in [-1, 1]. Channel c is component c over
        its standard deviation to the power `whitening`, the channels scaled together to a mean variance of 1: 1
        gives every channel unit variance; 0 keeps the pixels' proportions, so the block means carry most of the
        variance and a diffusion model over these latents settles them first, at high noise."""
        blocks = F.pixel_unshuffle(frames.double(), factor).permute(0, 2, 3, 1).reshape(-1, 3 * factor * factor)
        if channels > blocks.shape[1]:
            raise ValueError(f"{channels} channels > {blocks.shape[1]} values per {factor}x{factor} RGB block")
        mean = blocks.mean(0)
        values, vectors = torch.linalg.eigh(torch.cov((blocks - mean).T))
        top = values.argsort(descending=True)[:channels]
        basis = vectors[:, top].T
        basis *= torch.where(basis.sum(1, keepdim=True) < 0, -1.0, 1.0)  # a deterministic sign per component
        scale = values[top].clamp_min(1e-8).sqrt()
        if whitening != 1.0:
            scale = scale**whitening * (scale ** (2 - 2 * whitening)).mean().sqrt()  # latent var: var^(1-w) / mean
        return cls(factor, _round(mean), [_round(b) for b in basis], _round(scale))

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> latents [B, C, T, H/f, W/f]."""
        blocks = F.pixel_unshuffle(video.flatten(0, 1).float(), self.spatial_factor)  # [B*T, 3f^2, h, w]
        mean, basis, scale = (t.to(video.device) for t in (self.mean, self.basis, self.scale))
        z = torch.einsum("ck,nkhw->nchw", basis, blocks - mean[:, None, None]) / scale[:, None, None]
        return z.unflatten(0, video.shape[:2]).transpose(1, 2)

    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 frames [B, T, H, W, 3] (the pipeline's format) -> latents [B, C, T, H/f, W/f]."""
        return self.encode(frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1)

    def decode_pixels(self, z: Tensor) -> Tensor:
        """latents [B, C, T, h, w] -> video [B, T, 3, H, W], unclamped."""
        mean, basis, scale = (t.to(z.device) for t in (self.mean, self.basis, self.scale))
        zz = z.float().transpose(1, 2).flatten(0, 1) * scale[:, None, None]  # [B*T, C, h, w]
        blocks = torch.einsum("ck,nchw->nkhw", basis, zz) + mean[:, None, None]
        return F.pixel_shuffle(blocks, self.spatial_factor).unflatten(0, (z.shape[0], z.shape[2]))

    def decode_frames(self, z: Tensor) -> Tensor:
        """latents [B, C, T, h, w] -> uint8 frames [B, T, H, W, 3]."""
        video = self.decode_pixels(z).clamp(-1, 1)
        return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)

    def stream(self) -> _Stream:
        return _Stream(self)

    def to(self, device: str | torch.device) -> PatchPCACodec:
        return self  # its few numbers move with the latents

    def to_meta(self) -> dict:
        return {
            "type": "patch-pca",
            "factor": self.spatial_factor,
            "mean": self.mean.tolist(),
            "basis": self.basis.tolist(),
            "scale": self.scale.tolist(),
        }

    def save(self, directory: Path) -> None:
        pass  # fully described by its metadata

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> PatchPCACodec:
        return cls(meta["factor"], meta["mean"], meta["basis"], meta["scale"])


def _round(t: Tensor) -> list:
    return [round(float(x), 6) for x in t]


class _Stream:
    def __init__(self, codec: PatchPCACodec) -> None:
        self.codec = codec

    def decode(self, z: Tensor) -> Tensor:
        return self.codec.decode_frames(z)  # frames are independent: nothing to carry between chunks
