"""Measure one training step of every stage at a small size, then scale it to Wan2.1-T2V-1.3B (estimates).

    python -m train.estimate --out /tmp/est          # writes /tmp/est/estimate.md and estimate.json

Measured at the small size (CPU, one process): the DiT forwards a step makes (whole-sequence or chunk, with or
without gradients, and their tokens), the activation bytes autograd saves for each backward (the largest), and the
static state (weights, gradients, AdamW moments, EMA, KV ring and its window snapshot). Scaled to 1.3B: activations
per token, layer and model width carry over linearly (measured per block with checkpointing off, then the
checkpointed figure: one block's activations plus every block's input). Everything is fp32, as the stages run today
(weights, AdamW state, the frozen teacher, the KV ring and, for `extended`, its window-start snapshot). FLOPs per
forward are 2 x params x tokens plus attention over the 21-frame ring; time assumes 40% of an H100's dense bf16 peak
(989 TFLOP/s, i.e. as if the matmuls ran in bf16/TF32) and ignores communication. All 1.3B figures are estimates,
not measurements: nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from sfpp.models.dit import WanConfig, WanModel, get_config
from train.common import Dist
from train.config import DMDConfig, GRPOConfig, ODEConfig, Recipe, TeacherConfig, get_recipe
from train.stages import STAGE_CLASSES, run_stage

H100_BF16 = 989e12
MFU = 0.4
WAN = get_config("wan2.1-1.3b")
WAN_FRAME_TOKENS = (480 // 16) * (832 // 16)  # 1560: 60 x 104 latents, 2 x 2 patches
WAN_HORIZON = WAN_WINDOW = 21


def small_recipe() -> Recipe:
    """Wan's proportions at a small size (ffn/dim ~ 5.8, as 8960/1536), the 21-frame horizon and window of the
    real recipe scaled down to 6, and a rollout of 4 windows for `extended`."""
    model = replace(get_recipe("smoke").model, dim=48, ffn_dim=280, num_heads=3, num_layers=2)
    return replace(
        get_recipe("smoke"),
        model=model,
        horizon=6,
        window=6,
        checkpoint_blocks=False,
        teacher=TeacherConfig(steps=1, batch_size=1, warmup=1),
        ode=ODEConfig(trajectories=1, euler_steps=8, steps=1, batch_size=1),
        self_forcing=DMDConfig(steps=1, batch_size=1, critic_per_gen=1, ema_start=0, rollout_frames=6),
        extended=DMDConfig(
            steps=1,
            batch_size=1,
            critic_per_gen=1,
            ema_start=0,
            rollout_frames=24,
            grad_step="last",
            noise_init="backward",
        ),  # fmt: skip
        grpo=GRPOConfig(steps=1, prompts_per_step=1, group_size=2, rollout_frames=6, inner_epochs=1),
    )


class Probe:
    """Counts DiT forwards (and their tokens) and, per backward, the activation bytes autograd saved since the last
    one and the query tokens of the forwards with gradients that saved them."""

    def __init__(self) -> None:
        self.forwards: dict[str, int] = defaultdict(int)  # kind -> calls
        self.tokens: dict[str, int] = defaultdict(int)  # kind -> query tokens summed over calls
        self.saved = self.grad_tokens = 0
        self.per_backward: list[tuple[int, int]] = []  # (bytes saved, tokens with gradients)
        self.weights: set[int] = set()

    def install(self) -> list:
        probe, undo = self, []
        for name in ("forward", "forward_chunk"):
            original = getattr(WanModel, name)

            def wrapped(model, x, t, *args, _original=original, _name=name, **kwargs):
                grad = torch.is_grad_enabled()
                kind = f"{_name}{'+grad' if grad else ''}"
                tokens = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] // 4  # 2x2 patches
                probe.forwards[kind] += 1
                probe.tokens[kind] += tokens
                probe.grad_tokens += tokens if grad else 0
                return _original(model, x, t, *args, **kwargs)

            setattr(WanModel, name, wrapped)
            undo.append((WanModel, name, original))
        backward = torch.autograd.backward

        def counted_backward(*args, **kwargs):
            probe.per_backward.append((probe.saved, probe.grad_tokens))
            probe.saved = probe.grad_tokens = 0
            return backward(*args, **kwargs)

        torch.autograd.backward = counted_backward
        undo.append((torch.autograd, "backward", backward))
        return undo

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        square = tensor.ndim == 4 and tensor.shape[-1] == tensor.shape[-2] >= 64  # [B, H, L, L] attention weights:
        if tensor.untyped_storage().data_ptr() not in self.weights and not square:  # CPU's math SDPA keeps them,
            self.saved += tensor.numel() * tensor.element_size()  # flash / memory-efficient attention does not
        return tensor


def measure(out: Path) -> dict:
    recipe = small_recipe()
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    results = {}
    for name in STAGE_CLASSES:
        probe = Probe()
        undo = probe.install()
        try:
            stage = STAGE_CLASSES[name](recipe, run, Dist())
            for m in stage.models.values():
                probe.weights |= {p.untyped_storage().data_ptr() for p in m.parameters()}
            probe.forwards.clear()
            probe.tokens.clear()
            probe.grad_tokens = 0
            with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
                stage.step(0)
            cfg = recipe.model
            per_unit = max(b / (t * cfg.num_layers * cfg.dim) for b, t in probe.per_backward if t)
            results[name] = {
                "forwards": dict(probe.forwards),
                "tokens": dict(probe.tokens),
                "backwards": [{"saved_bytes": b, "grad_tokens": t} for b, t in probe.per_backward],
                "peak_saved_bytes": max(b for b, _ in probe.per_backward),
                "peak_grad_tokens": max(t for _, t in probe.per_backward),
                "bytes_per_token_layer_width": per_unit,
            }
        finally:
            for obj, attr, original in undo:
                setattr(obj, attr, original)
        run_stage(name, recipe, run, Dist())  # the next stage needs this one's output
    return {"recipe": recipe, "stages": results}


def params(cfg: WanConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(cfg).parameters())


def scale_to_wan(measured: dict) -> str:
    small: Recipe = measured["recipe"]
    small_tokens_per_frame = (small.latent_size // 2) ** 2
    token_ratio = WAN_FRAME_TOKENS / small_tokens_per_frame
    # frames scale with the horizon (21 / 6) except the extended rollout, whose length is the recipe's N
    frame_ratio = WAN_HORIZON / small.horizon
    p_wan = params(WAN)
    lines = [
        "| stage | forwards per step (small: chunk / whole-seq / with grad) | backwards | activations saved, small "
        "| 1.3B activations of the largest backward (no ckpt / ckpt) | 1.3B generator chunk replay (no ckpt / ckpt) "
        "| 1.3B static per GPU, 1 / 8 GPUs | 1.3B step time, 1 / 8 H100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    attn_flops_per_token = 4 * WAN.dim * WAN.num_layers * (WAN_WINDOW * WAN_FRAME_TOKENS)  # QK^T and PV over the ring
    for name, r in measured["stages"].items():
        f, t = r["forwards"], r["tokens"]
        act = r["peak_saved_bytes"]
        per_unit = r["bytes_per_token_layer_width"]
        # the largest backward at 1.3B: its tokens scale with the frame size, and with the horizon for whole clips
        grad_tokens_wan = r["peak_grad_tokens"] * token_ratio * (frame_ratio if name in ("teacher", "ode") else 1)
        if name in ("dmd", "extended"):  # the largest backward is the critic's, over the K-frame window
            grad_tokens_wan = r["peak_grad_tokens"] * token_ratio * frame_ratio
        act_wan = per_unit * grad_tokens_wan * WAN.num_layers * WAN.dim
        ckpt_wan = act_wan / WAN.num_layers + grad_tokens_wan * WAN.dim * 4 * WAN.num_layers  # one block + inputs
        replay = "-"
        if name in ("dmd", "extended"):  # the generator's backward: one chunk's exit step
            chunk_tokens = WAN_FRAME_TOKENS * small.frames_per_chunk
            gen = per_unit * chunk_tokens * WAN.num_layers * WAN.dim
            gen_ckpt = gen / WAN.num_layers + chunk_tokens * WAN.dim * 4 * WAN.num_layers
            replay = f"{gen / 2**30:.0f} / {gen_ckpt / 2**30:.1f} GiB"
        trained = {"teacher": 1, "ode": 1, "dmd": 2, "extended": 2, "grpo": 1}[name]
        frozen = {"teacher": 0, "ode": 1, "dmd": 1, "extended": 1, "grpo": 0}[name]
        ring = 2 * WAN.num_layers * WAN_WINDOW * WAN_FRAME_TOKENS * WAN.dim * 4  # fp32 K and V, as the stages keep it
        ring *= 2 if name == "extended" else 1  # + the window-start snapshot
        ring *= 0 if name in ("teacher", "ode") else 1
        statics = []
        for gpus in (1, 8):
            # fp32 weights + grads + 2 AdamW moments (+ EMA for the generator), sharded; the frozen fp32 teacher whole
            trained_bytes = trained * p_wan * 16 + (p_wan * 4 if name in ("dmd", "extended") else 0)
            statics.append((trained_bytes / gpus + frozen * p_wan * 4 + ring) / 2**30)
        tokens_wan = {k: v * token_ratio * (frame_ratio if k.startswith("forward") and name in ("teacher", "ode")
                                             else 1) for k, v in t.items()}  # fmt: skip
        if name == "extended":  # the measured rollout was 24 of 6-frame windows; the recipe rolls out N=400 of 21
            n_ratio = 400 / 24
            tokens_wan = {k: v * n_ratio if "grad" not in k else v * frame_ratio for k, v in tokens_wan.items()}
        fwd_tokens = sum(tokens_wan.values())
        grad_tok = sum(v for k, v in tokens_wan.items() if "grad" in k)
        flops = 2 * p_wan * fwd_tokens + attn_flops_per_token * fwd_tokens
        flops += 2 * (2 * p_wan + attn_flops_per_token) * grad_tok  # backward ~ 2x forward
        flops += (2 * p_wan + attn_flops_per_token) * grad_tok  # checkpoint recompute
        times = [flops / (gpus * H100_BF16 * MFU) for gpus in (1, 8)]
        chunk, whole = (
            f.get("forward_chunk", 0) + f.get("forward_chunk+grad", 0),
            f.get("forward", 0) + f.get("forward+grad", 0),
        )
        counts = f"{chunk} / {whole} / {f.get('forward_chunk+grad', 0) + f.get('forward+grad', 0)}"
        lines.append(
            f"| {name} | {counts} | {len(r['backwards'])} | {act / 2**20:.2f} MiB | {act_wan / 2**30:.0f} / "
            f"{ckpt_wan / 2**30:.1f} GiB | {replay} | {statics[0]:.0f} / {statics[1]:.0f} GiB "
            f"| {times[0]:.1f} / {times[1]:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.estimate", description=__doc__)
    p.add_argument("--out", default="runs/estimate")
    args = p.parse_args(argv)
    out = Path(args.out)
    measured = measure(out)
    table = scale_to_wan(measured)
    (out / "estimate.md").write_text(table + "\n")
    (out / "estimate.json").write_text(json.dumps(measured["stages"], indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
