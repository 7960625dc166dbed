"""Wan's 3D RoPE: the frequency tables of the (t, h, w) axes and the pairwise rotation. The model rotates queries and
keys with them; the ring cache re-bases its keys with `temporal_rotation` past the table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # for annotations only: the model imports this module
    from sfpp.models.dit import WanConfig


def rope_frequencies(cfg: WanConfig) -> list[Tensor]:
    """Angular frequencies (fp64, CPU) of the t, h and w axes: rope_split[a] / 2 of them each."""
    return [
        1.0 / cfg.rope_theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        for axis_dim in cfg.rope_split
    ]


def rope_table(cfg: WanConfig) -> tuple[Tensor, Tensor]:
    """cos/sin tables [rope_max_positions, head_dim/2]: columns are the t, h and w frequencies side by side."""
    positions = torch.arange(cfg.rope_max_positions, dtype=torch.float64)
    angles = torch.cat([torch.outer(positions, inv) for inv in rope_frequencies(cfg)], dim=1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def temporal_rotation(cfg: WanConfig, shift: int) -> tuple[Tensor, Tensor]:
    """cos/sin [1, rope_split[0] / 2] that move a key already rotated at temporal position p to p + shift: RoPE
    rotations compose, R(p + shift) = R(shift) R(p). Applied by `apply_rope` to the first rope_split[0] dims."""
    angles = shift * rope_frequencies(cfg)[0][None]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) as Wan does. x [B, L, H, D], cos/sin [L, D/2]."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)
