"""Loading DiT weights: Wan's original layout, the diffusers layout, and key/shape validation with clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors, or an unreadable file."""


def load_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or .pt/.pth/.bin (tensors only, memory-mapped where possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt or truncated file: say which one
        raise CheckpointError(f"could not read checkpoint {path}: {exc}") from exc


# diffusers name -> Wan name, applied as whole dotted components (order matters: longest first).
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is Wan's cross-attention norm3
]


def is_diffusers_layout(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in state_dict)


def convert_diffusers_to_wan(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `WanTransformer3DModel` state dict to Wan's original parameter names."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _DIFFUSERS_TO_WAN:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def _summary(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: model {expected[k]} vs {source} {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_summary(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_summary(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_summary(mismatched, 4)})")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Validate, convert from the diffusers layout if needed, and load into `model` (cast to its dtype)."""
    if is_diffusers_layout(state_dict):
        state_dict = convert_diffusers_to_wan(state_dict)
    check_state_dict(model, state_dict, source=source)
    # A model built on the meta device takes the loaded tensors as they are: no second copy in memory.
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    return model
