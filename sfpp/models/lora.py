"""LoRA adapters of a DiT, merged into its weights at load time: W <- W + (alpha / r) B A for every adapted linear,
the merge peft's `merge_and_unload` performs for a plain (non-rsLoRA, non-DoRA) LoRA; tests/test_lora.py checks it
against peft itself. Merged, the adapted model is an ordinary WanModel: the fast path (kernels, CUDA graphs) is
unchanged and costs nothing extra per chunk.

Files: peft state dicts as `peft.get_peft_model_state_dict` writes them (`<prefix>blocks.0.self_attn.q.lora_A.weight`,
`...lora_B.weight`), alone or under a `generator_lora` entry (LongLive's `lora.pt`), in .pt or .safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sfpp.models.checkpoint import CheckpointError, load_file

LORA_ENTRY = "generator_lora"  # LongLive's key for the generator's adapter (its critic's is `critic_lora`)
_PREFIXES = ("base_model.model.", "model.", "module.", "_orig_mod.")


def read_lora(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (A [r, in], B [out, r])} of a LoRA file, module names as the DiT's (`blocks.0.self_attn.q`)."""
    raw = load_file(path)
    sd = raw.get(LORA_ENTRY, raw) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(
            f"{path} holds no LoRA weights (expected lora_A/lora_B tensors or a {LORA_ENTRY!r} entry)"
        )
    return lora_parts(sd, source=str(path))


def lora_parts(sd: dict[str, Tensor], *, source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (A, B)} of peft LoRA entries (`<module>.lora_A[.<adapter>].weight`); every entry must be one."""
    path = source
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in name:  # `q.lora_A.weight`, or with peft's adapter name: `q.lora_A.default.weight`
                module, rest = name.split(marker, 1)
                if not rest.endswith("weight"):
                    raise CheckpointError(f"{path}: {key} is a LoRA {half} entry that is not a weight")
                parts.setdefault(module, {})[half] = value
                break
        else:
            raise CheckpointError(
                f"{path}: {key} is not a LoRA weight (lora_A/lora_B); is this a LoRA file? A full checkpoint goes to "
                "--checkpoint"
            )
    broken = sorted(m for m, p in parts.items() if len(p) != 2)
    if broken:
        missing = "lora_B" if "lora_A" in parts[broken[0]] else "lora_A"
        raise CheckpointError(f"{path}: {broken[0]} has no {missing} weight ({len(broken)} such modules)")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in parts.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict[str, tuple[Tensor, Tensor]], alpha: float | None, *, source: str) -> int:
    """Add (alpha / r) B A into the weight of each adapted linear of `model`, in fp32, then cast back; alpha None
    means alpha = r (scale 1). Every adapted module must exist with matching shapes: a file for another model is a
    clear error, never a silent base model. Returns the number of modules merged."""
    modules = dict(model.named_modules())
    missing = sorted(m for m in lora if not isinstance(modules.get(m), nn.Linear))
    if missing:
        raise CheckpointError(
            f"{source} adapts modules this model does not have as linears: {missing[:5]}"
            f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}"
        )
    for name, (a, b) in lora.items():
        weight = modules[name].weight
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(
                f"{source}: {name} has LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)}, which do not fit its "
                f"weight {tuple(weight.shape)}"
            )
        scale = (rank if alpha is None else alpha) / rank
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scale
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(lora)


def load_lora(model: nn.Module, path: str | Path, alpha: float | None = None) -> nn.Module:
    """Merge the LoRA file at `path` into `model` (see `merge_lora`)."""
    merge_lora(model, read_lora(path), alpha, source=str(path))
    return model
