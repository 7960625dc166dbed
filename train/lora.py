"""LoRA for the trained DiTs (generator, critic, GRPO policy) through peft, and the merge back into a plain WanModel.

`add_lora` injects peft's LoRA layers into a WanModel in place (the model keeps its class and its `forward_chunk`,
`text_kv` methods; peft freezes everything but the adapters). Its state dict then holds the frozen base weights
under `<linear>.base_layer.*` and the adapters under `<linear>.lora_A.default.weight` / `lora_B`. `plain_state_dict`
turns such a state dict into the plain WanModel's, with W <- W + (alpha / r) B A merged by `sfpp.models.lora` (the
merge inference applies to released LoRAs): that is what the stages write as their outputs, so every later stage,
`Pipeline.from_pretrained(..., checkpoint=)` and the rollout copy (`train.rollout.RolloutModel`) load a plain
checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sfpp.models.dit import WanModel
from sfpp.models.lora import lora_parts, merge_lora

# Every linear of a DiT block: self- and cross-attention projections, the FFN. peft matches module-name suffixes; the
# FFN's linears are `ffn.0` and `ffn.2`.
TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]


def add_lora(model: WanModel, rank: int, alpha: float | None) -> WanModel:
    """Inject rank-`rank` LoRA adapters (scale alpha / rank; alpha None: 1) into every block linear, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # peft freezes the base; make sure, the adapters alone train
        p.requires_grad_(".lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def plain_state_dict(sd: dict[str, Tensor], model: WanModel, alpha: float | None, rank: int) -> dict[str, Tensor]:
    """A peft-adapted WanModel's full state dict -> the plain WanModel's, adapters merged (fp32, `merge_lora`).
    `model` supplies the config; a state dict without adapters comes back unchanged."""
    lora = {k: v for k, v in sd.items() if ".lora_" in k}
    if not lora:
        return sd
    base = {k.replace(".base_layer.", "."): v.clone() for k, v in sd.items() if ".lora_" not in k}  # merged into
    with torch.device("meta"):
        plain = WanModel(model.cfg)
    plain.load_state_dict(base, assign=True, strict=True)
    merge_lora(plain, lora_parts(lora, source="the trained LoRA"), alpha or rank, source="the trained LoRA")
    return {k: v.contiguous() for k, v in plain.state_dict().items()}
