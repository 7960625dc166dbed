"""Measure one training step of every stage at a small size, then scale it to Wan2.1-T2V-1.3B at 832x480.

    python -m train.estimate --out /tmp/est          # writes /tmp/est/estimate.md and estimate.json

Measured at the small size (CPU, one process, bf16 through the same MixedPrecisionPolicy as training, checkpointing
off): every DiT forward a step makes (chunk or whole sequence, with or without gradients, its query tokens) and the
activation bytes autograd saves for each backward. The forward counts are checked against the cost model below for
the windows the step drew (`passes`): the model counts what the code runs. Everything at 1.3B is computed, not
measured (no GPU ran any of it):

- memory per GPU: fp32 master weights, gradients and AdamW moments of the trained models (generator and critic; with
  LoRA the frozen base keeps fp32 master weights and only the adapters have gradients and moments) and the EMA,
  sharded over the GPUs by FSDP2; two bf16 DiT blocks gathered at a time (one computing, one prefetched) and the
  gathered root; the frozen real score and the rollout copy (`train.rollout.RolloutModel`) whole in bf16; the bf16
  KV ring of `window` frames per sample and its window-start snapshot; activations of the largest backward (the
  critic's over the K-frame window): the measured bytes per token, layer and width scaled to 1.3B's width and
  tokens, with every k-th block checkpointed (its fp32 input kept, the others' activations kept whole, one block
  recomputed at a time); the rollout copy's refresh after each optimizer step gathers one fp32 copy of the full
  weights (two with LoRA, whose merge copies them), which is the peak when it exceeds the activations.
- time: FLOPs per forward are 2 x params x tokens plus self-attention 4 x dim x layers x query x key tokens over the
  keys the ring holds (cross-attention over 512 text tokens likewise); a backward costs 2 forwards, a checkpointed
  block's recompute one more. Time = FLOPs / (GPUs x 989 TFLOP/s dense bf16 x MFU), MFU stated (`--mfu`), data
  parallel (each GPU computes its own samples), communication assumed hidden behind compute.
- the fast path's factor on rollouts: before, the no-grad rollouts ran in fp32 (TF32 tensor cores, 495 TFLOP/s dense)
  through the trained, sharded module; now in bf16 through the rollout copy. At equal MFU that is the bf16/TF32 peak
  ratio, 2x. What the fused kernels, fp8 KV and CUDA graphs add on top was not measured (no GPU) and is not in it.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sfpp.benchmark import record
from sfpp.models.dit import WanConfig, WanModel, get_config
from train.common import Dist
from train.config import DMDConfig, GRPOConfig, ODEConfig, Recipe, TeacherConfig, get_recipe
from train.lora import TARGETS
from train.stages import STAGE_CLASSES, run_stage

GiB = 2**30
H100_BF16, H100_TF32 = 989e12, 494.7e12  # dense tensor-core peaks, FLOP/s
WAN = get_config("wan2.1-1.3b")
FRAME_TOKENS = (480 // 16) * (832 // 16)  # 1560: 60 x 104 latents in 2 x 2 patches
TEXT_TOKENS = 512
STEPS = 4  # the student's denoising steps
# The paper's setting: 8 H100s, batch 8, 100 s rollouts (1600 frames at 16 fps: 400 latent frames), window 21,
# 12,500 iterations (an iteration: one critic update, with a generator update every 5th, as Self-Forcing counts).
PAPER = {"gpus": 8, "batch": 8, "rollout_frames": 400, "window": 21, "iterations": 12_500, "h100_days": 48}
BUDGET = {8: 60, 1: 70}  # GiB per GPU the setups must fit in (an H100 has 80 GB)


def small_recipe() -> Recipe:
    """Wan's proportions at a small size (ffn/dim ~ 5.8, as 8960/1536), horizon = window = 6 frames, a 24-frame
    rollout for `extended`, bf16 as the wan recipe, no checkpointing (the measured activations are whole)."""
    model = replace(get_recipe("smoke").model, dim=48, ffn_dim=280, num_heads=3, num_layers=2)
    one = dict(steps=1, batch_size=1, critic_per_gen=1, ema_start=0)
    return replace(
        get_recipe("smoke"),
        model=model,
        horizon=6,
        window=6,
        checkpoint_blocks=0,
        dtype="bfloat16",
        teacher=TeacherConfig(steps=1, batch_size=1, warmup=1),
        ode=ODEConfig(trajectories=1, euler_steps=8, steps=1, batch_size=1),
        self_forcing=DMDConfig(rollout_frames=6, **one),
        extended=DMDConfig(rollout_frames=24, grad_step="last", noise_init="backward", **one),
        grpo=GRPOConfig(steps=1, prompts_per_step=1, group_size=2, rollout_frames=6, inner_epochs=1),
    )


# ------------------------------------------------------------------------------------------------ the cost model


@dataclass(frozen=True)
class Pass:
    """Forwards of one kind in a step: `calls` of them, each over `samples` x `frames` query frames attending to
    `keys` frames; `grad`: with gradients; `rollout`: a no-grad student pass whose values nothing replays."""

    kind: str  # "forward_chunk" or "forward" (whole sequence)
    calls: int
    samples: int
    frames: int
    keys: int
    grad: bool = False
    rollout: bool = False


def _chunk_keys(first_chunk: int, chunks: int, fpc: int, window: int) -> list[int]:
    return [min((c + 1) * fpc, window) for c in range(first_chunk, first_chunk + chunks)]


def window_passes(start: int, noise_step: int, exit_step: int, k: int, fpc: int, window: int, b: int) -> list[Pass]:
    """`rollout.window_rollout`: the context rollout, the first pass of backward noise initialisation, the window."""
    out, window_chunks, first = [], math.ceil(k / fpc), start // fpc
    for keys in _chunk_keys(0, first, fpc, window):  # the context, through the chunk runner
        out.append(Pass("forward_chunk", STEPS + 1, b, fpc, keys, rollout=True))
    for keys in _chunk_keys(first, window_chunks, fpc, window):
        if noise_step > 0:  # the window rolled out clean once, to be re-noised (the ring restored after it)
            out.append(Pass("forward_chunk", STEPS + 1, b, fpc, keys, rollout=True))
        out.append(Pass("forward_chunk", exit_step - noise_step + 2, b, fpc, keys))  # restart .. exit, context pass
    return out


def dmd_passes(recipe: Recipe, cfg: DMDConfig, draws: list[tuple], gen_update: bool, b: int) -> list[Pass]:
    """One step of `DMDStage.step` for the draws it made (the generator's window first when it updates)."""
    k, fpc, w = recipe.horizon, recipe.frames_per_chunk, recipe.window
    out, draws = [], list(draws)
    if gen_update:
        start, s, exits = draws.pop(0)
        out += window_passes(start, s, exits[0], k, fpc, w, b)
        out.append(Pass("forward", 1, 2 * b, k, k))  # the real score, CFG: conditional and unconditional together
        out.append(Pass("forward", 1, b, k, k))  # the fake score
        for keys in _chunk_keys(start // fpc, math.ceil(k / fpc), fpc, w):  # the replay: exit step, context pass
            out += [Pass("forward_chunk", 1, b, fpc, keys, grad=True), Pass("forward_chunk", 1, b, fpc, keys)]
    start, s, exits = draws.pop(0)
    out += window_passes(start, s, exits[0], k, fpc, w, b)
    out.append(Pass("forward", 1, b, k, k, grad=True))  # the critic's flow matching
    return out


def grpo_passes(recipe: Recipe, b: int) -> list[Pass]:
    cfg, fpc, w = recipe.grpo, recipe.frames_per_chunk, recipe.window
    chunks = _chunk_keys(0, math.ceil(cfg.rollout_frames / fpc), fpc, w)
    out = [Pass("forward_chunk", STEPS + 1, b, fpc, keys, rollout=True) for keys in chunks]  # the policy's rollout
    for _ in range(cfg.inner_epochs):  # the replay: the re-noising steps with gradients, then the context pass
        out += [p for keys in chunks for p in (Pass("forward_chunk", STEPS - 1, b, fpc, keys, grad=True),
                                                Pass("forward_chunk", 1, b, fpc, keys))]  # fmt: skip
    return out


def step_passes(name: str, recipe: Recipe, draws: list[tuple], step: int, b: int) -> list[Pass]:
    k = recipe.horizon
    if name == "teacher":
        return [Pass("forward", 1, b, k, k, grad=True)]
    if name == "ode":
        return [Pass("forward", 1, b, k, k, grad=True)]  # block-causal: counted as whole-sequence attention
    if name == "grpo":
        return grpo_passes(recipe, b * recipe.grpo.group_size)
    cfg = recipe.dmd(name)
    return dmd_passes(recipe, cfg, draws, step % cfg.critic_per_gen == 0, b)


def expected_dmd_step(recipe: Recipe, cfg: DMDConfig, b: int) -> list[tuple[float, list[Pass]]]:
    """The step's passes over every window draw, each with its probability (uniform starts and noise steps, as
    `DMDStage.draw_window`; exit at the last step, or uniform from the noise step on), and over the generator-update
    and critic-only steps (1 in critic_per_gen)."""
    fpc, k = recipe.frames_per_chunk, recipe.horizon
    starts = [fpc * i for i in range((cfg.rollout_frames - k) // fpc + 1)] if cfg.window_sampling == "uniform" else None
    if starts is None:
        raise ValueError("the estimate models uniform window starts only")
    noise = range(STEPS) if cfg.noise_init == "backward" else [0]
    draws = []
    for s in noise:
        exits = [STEPS - 1] if cfg.grad_step == "last" else list(range(s, STEPS))
        draws += [((start, s, (e,)), 1 / len(starts) / len(noise) / len(exits)) for start in starts for e in exits]
    out = []
    for gen in (True, False):
        p_step = 1 / cfg.critic_per_gen if gen else 1 - 1 / cfg.critic_per_gen
        for draw, p in draws:  # the generator's and the critic's windows are independent draws: same expectation
            pair = [draw, draw] if gen else [draw]
            out.append((p_step * p, dmd_passes(recipe, cfg, pair, gen, b)))
    return out


# ------------------------------------------------------------------------------------------------ measurement


class Probe:
    """Counts DiT forwards per kind (and their query tokens), and per backward the activation bytes autograd saved
    since the last one and the query tokens of the forwards with gradients that saved them. Weights and their views
    (FSDP's gathered bf16 copies included) are not activations: tensors sharing a parameter's storage are skipped."""

    def __init__(self) -> None:
        self.forwards: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.saved = self.grad_tokens = 0
        self.per_backward: list[tuple[int, int]] = []
        self.modules: list[nn.Module] = []

    def install(self) -> list:
        probe, undo = self, []
        for name in ("forward", "forward_chunk"):
            original = getattr(WanModel, name)

            def wrapped(model, x, t, *args, _original=original, _name=name, **kwargs):
                grad = torch.is_grad_enabled()
                tokens = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] // 4  # 2x2 patches
                probe.forwards[f"{_name}{'+grad' if grad else ''}"] += 1
                probe.tokens[f"{_name}{'+grad' if grad else ''}"] += tokens
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
        from torch.distributed.tensor import DTensor

        local = (p.to_local() if isinstance(p, DTensor) else p for m in self.modules for p in m.parameters())
        weights = {t.untyped_storage().data_ptr() for t in local if t.numel()}
        square = tensor.ndim == 4 and tensor.shape[-1] == tensor.shape[-2] >= 64  # [B, H, L, L] attention weights:
        if tensor.untyped_storage().data_ptr() not in weights and not square:  # CPU's math SDPA keeps them, flash
            self.saved += tensor.numel() * tensor.element_size()  # and memory-efficient attention do not
        return tensor


def measure(run: Path) -> dict:
    recipe = small_recipe()
    results = {}
    for name in STAGE_CLASSES:
        probe = Probe()
        undo = probe.install()
        try:
            stage = STAGE_CLASSES[name](recipe, run, Dist())
            probe.modules = list(stage.models.values())
            probe.forwards.clear()
            probe.tokens.clear()
            probe.grad_tokens, drawn = 0, len(stage.draws)
            with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
                stage.step(0)
            draws = stage.draws[drawn:]
            batch = {"teacher": recipe.teacher, "ode": recipe.ode}.get(name)
            b = batch.batch_size if batch else recipe.grpo.prompts_per_step if name == "grpo" else 1
            model = step_passes(name, recipe, draws, 0, b)
            counted = defaultdict(int)
            for p in model:
                counted[f"{p.kind}{'+grad' if p.grad else ''}"] += p.calls
            if dict(counted) != dict(probe.forwards):
                raise RuntimeError(f"[{name}] the cost model counts {dict(counted)}, the step ran {probe.forwards}")
            cfg = recipe.model
            per_unit = max(b_ / (t * cfg.num_layers * cfg.dim) for b_, t in probe.per_backward if t)
            results[name] = {
                "forwards": dict(probe.forwards),
                "tokens": dict(probe.tokens),
                "draws": draws,
                "backwards": [{"saved_bytes": b_, "grad_tokens": t} for b_, t in probe.per_backward],
                "bytes_per_token_layer_width": per_unit,
            }
        finally:
            for obj, attr, original in undo:
                setattr(obj, attr, original)
        run_stage(name, recipe, run, Dist())  # the next stage needs this one's output
    return results


# ------------------------------------------------------------------------------------------------ scaling to 1.3B


def params(cfg: WanConfig) -> tuple[int, int, int]:
    """(all parameters, one block's, LoRA parameters per unit of rank over `train.lora.TARGETS`)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    lora = sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(n.endswith(f".{t}") for t in TARGETS))  # fmt: skip
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters()), lora


def pass_flops(p: Pass, n_params: int) -> float:
    q = p.samples * p.frames * FRAME_TOKENS
    per_forward = 2 * n_params * q + 4 * WAN.dim * WAN.num_layers * q * (p.keys * FRAME_TOKENS + TEXT_TOKENS)
    return p.calls * per_forward


@dataclass(frozen=True)
class Setup:
    gpus: int
    micro: int  # samples per GPU per micro-batch
    accumulate: int
    lora_rank: int
    checkpoint_every: int  # 1: every block; k: every k-th; 0: none

    def describe(self) -> str:
        lora = f", LoRA rank {self.lora_rank}" if self.lora_rank else ""
        return (f"{self.gpus} x H100, {self.micro} sample(s) per GPU x {self.accumulate} micro-batch(es){lora}, bf16, "
                f"checkpointing every {self.checkpoint_every} block(s)")  # fmt: skip


def micro_batches(name: str, setup: Setup, recipe: Recipe) -> tuple[int, int]:
    """(samples per micro-batch, micro-batches per step) of a stage on a setup. GRPO: one prompt's group per
    micro-batch (its ring holds the group), as many micro-batches as the recipe's prompts per step on each of 8 GPUs
    (the same batch on fewer GPUs); the others: the setup's."""
    if name == "grpo":
        return setup.micro * recipe.grpo.group_size, recipe.grpo.prompts_per_step * 8 // setup.gpus
    return setup.micro, setup.accumulate


def memory(name: str, measured: dict, setup: Setup, recipe: Recipe) -> dict[str, float]:
    """Per-GPU bytes at 1.3B, by part."""
    n, block, lora_unit = params(WAN)
    g, r = setup.gpus, setup.lora_rank
    trained = {"teacher": 1, "ode": 1, "dmd": 2, "extended": 2, "grpo": 1}[name]
    lora_stage = r > 0 and name in ("dmd", "extended", "grpo")  # `Stage.with_lora`
    if lora_stage:
        state = trained * (4 * n + 16 * r * lora_unit) / g
        ema = 4 * r * lora_unit / g if name in ("dmd", "extended") else 0
    else:
        state = trained * 16 * n / g
        ema = 4 * n / g if name in ("dmd", "extended") else 0
    gathered = 2 * (2 * block + (n - WAN.num_layers * block))  # bf16: a block computing, one prefetched, the root
    frozen = 2 * n if name in ("dmd", "extended") else 0  # the real score, bf16, whole
    rollout_copy = 2 * n if name in ("dmd", "extended", "grpo") else 0
    samples, _ = micro_batches(name, setup, recipe)
    ring = 2 * WAN.num_layers * (recipe.window * FRAME_TOKENS + TEXT_TOKENS) * WAN.dim * 2 * samples
    ring *= 0 if name in ("teacher", "ode") else 2 if name in ("dmd", "extended") else 1  # + the window snapshot
    # the largest backward: the critic's (or teacher's, ODE student's) over the K-frame window, GRPO's one chunk
    frames = recipe.frames_per_chunk if name == "grpo" else recipe.horizon
    tokens = samples * frames * FRAME_TOKENS
    per_block = measured[name]["bytes_per_token_layer_width"] * tokens * WAN.dim  # one block's saved activations
    k = setup.checkpoint_every
    checked = len(range(0, WAN.num_layers, k)) if k else 0
    activations = checked * tokens * WAN.dim * 4 + (WAN.num_layers - checked) * per_block + (per_block if k else 0)
    refresh = (4 * n * (2 if lora_stage else 1)) if rollout_copy else 0
    static = state + ema + gathered + frozen + rollout_copy + ring
    return {
        "trained state": state + ema,
        "gathered bf16 units": gathered,
        "real score": frozen,
        "rollout copy": rollout_copy,
        "KV ring": ring,
        "activations": activations,
        "refresh transient": refresh,
        "peak": static + max(activations, refresh),
    }


def fit_checkpointing(name: str, measured: dict, setup: Setup, recipe: Recipe, budget: float) -> int:
    """The sparsest checkpointing (largest k, 0 = none) whose peak fits the budget; 1 if none does."""
    for k in [0, *range(WAN.num_layers, 0, -1)]:
        if memory(name, measured, replace(setup, checkpoint_every=k), recipe)["peak"] <= budget * GiB:
            return k
    return 1


def step_time(name: str, recipe: Recipe, setup: Setup, mfu: float) -> dict[str, float]:
    """Expected seconds per step per GPU (every GPU computes its own micro-batches), split into the no-grad
    rollouts and the rest, and the rollouts' time on the old fp32 path."""
    n, _, _ = params(WAN)
    b, a = micro_batches(name, setup, recipe)
    if name in ("dmd", "extended"):
        cfg = recipe.dmd(name)
        cases = expected_dmd_step(recipe, cfg, b)
    else:  # GRPO's passes take prompts (times the group size), ODE's its batch
        bb = recipe.ode.batch_size if name == "ode" else b // recipe.grpo.group_size if name == "grpo" else b
        cases = [(1.0, step_passes(name, recipe, [], 0, bb))]
    k = setup.checkpoint_every
    recompute = (len(range(0, WAN.num_layers, k)) / WAN.num_layers) if k else 0.0
    rollout = train = 0.0
    for p_case, passes in cases:
        for p in passes:
            flops = pass_flops(p, n) * (3 + recompute if p.grad else 1)
            if p.rollout:
                rollout += p_case * flops
            else:
                train += p_case * flops
    rate = H100_BF16 * mfu
    return {
        "rollout_s": a * rollout / rate,
        "train_s": a * train / rate,
        "step_s": a * (rollout + train) / rate,
        "rollout_fp32_s": a * rollout / (H100_TF32 * mfu),
    }


def paper_recipe() -> Recipe:
    recipe = get_recipe("wan2.1-1.3b")
    if recipe.extended.rollout_frames != PAPER["rollout_frames"] or recipe.window != PAPER["window"]:
        raise ValueError("the wan2.1-1.3b recipe no longer has the paper's 400-frame rollouts and 21-frame window")
    return recipe


def report(measured: dict, mfu: float, lora_rank: int, commit: str) -> tuple[str, dict]:
    recipe = paper_recipe()
    n, _, lora_unit = params(WAN)
    eight = Setup(gpus=8, micro=1, accumulate=1, lora_rank=0, checkpoint_every=1)
    one = Setup(gpus=1, micro=1, accumulate=8, lora_rank=lora_rank, checkpoint_every=1)
    stages = ("ode", "dmd", "extended", "grpo")
    data: dict = {"mfu": mfu, "params": n, "lora_params": lora_rank * lora_unit, "setups": {}}
    lines = [
        "# Training cost of Self-Forcing++ on Wan2.1-T2V-1.3B at 832x480: measured small, computed at 1.3B",
        "",
        f"Command: `OMP_NUM_THREADS=1 python -m train.estimate --out train/results/estimate` (CPU, one process; "
        f"commit {commit}). Small size: dim 48, ffn 280, 2 layers, 8x8 latents, horizon = window = 6 frames, "
        "`extended` rollouts of 24 frames, bf16 (MixedPrecisionPolicy over a group of one), no checkpointing.",
        "",
        "**Measured** (small size, `estimate.json`): the forwards each stage's step makes, per kind, which equal the "
        "cost model's count for the windows the step drew (the script stops otherwise), and the activation bytes "
        "autograd saves per backward. **Not measured**: everything at 1.3B. Memory is the sum of the parts listed "
        "(`train/estimate.py`'s docstring says how each is computed; allocator fragmentation, NCCL buffers and the "
        "CUDA context, ~1-3 GiB, are not in it); time is FLOPs at a stated MFU, not a run. No GPU ran any of this.",
        "",
        f"Paper's setting: {PAPER['gpus']} H100s, batch {PAPER['batch']}, 100 s rollouts ({PAPER['rollout_frames']} "
        f"latent frames), window {PAPER['window']}, {PAPER['iterations']:,} iterations (one critic update each, a "
        "generator update every 5th). Parameters: "
        f"{n / 1e9:.2f} B; LoRA rank {lora_rank} on every block linear: {lora_rank * lora_unit / 1e6:.0f} M.",
        "",
    ]
    for setup, budget in ((eight, BUDGET[8]), (one, BUDGET[1])):
        lines += [f"## Peak memory per GPU: {setup.describe()} (budget {budget} GiB)", ""]
        parts = list(memory("extended", measured, setup, recipe))
        lines += ["| stage | " + " | ".join(parts) + " | sparsest checkpointing that fits: every k-th block, "
                  "peak |", "|---" * (len(parts) + 2) + "|"]  # fmt: skip
        rows = {}
        for name in stages:
            m = memory(name, measured, setup, recipe)
            k = fit_checkpointing(name, measured, setup, recipe, budget)
            fit = memory(name, measured, replace(setup, checkpoint_every=k), recipe)["peak"]
            cells = " | ".join(f"{v / GiB:.1f}" for v in m.values())
            lines.append(f"| {name} | {cells} GiB | k = {k or 'none'}: {fit / GiB:.1f} GiB |")
            rows[name] = {**{key: v / GiB for key, v in m.items()}, "fit_k": k, "fit_peak": fit / GiB}
        data["setups"][setup.describe()] = rows
        lines.append("")
    lines += [
        f"## Step time (expected over the window draws) at {mfu:.0%} MFU",
        "",
        "| stage | s per step, 8 GPUs (1 sample each) | s per step, 1 GPU (8 micro-batches) | no-grad rollouts' share "
        "| rollouts: fp32 path / bf16 fast path |",
        "|---|---|---|---|---|",
    ]
    times = {}
    for name in stages:
        t8, t1 = step_time(name, recipe, eight, mfu), step_time(name, recipe, one, mfu)
        share = t8["rollout_s"] / t8["step_s"]
        factor = f"{t8['rollout_fp32_s'] / t8['rollout_s']:.1f}x" if t8["rollout_s"] else "- (none)"
        lines.append(f"| {name} | {t8['step_s']:.1f} | {t1['step_s']:.1f} | {share:.0%} | {factor} |")
        times[name] = {"8": t8, "1": t1}
    data["times"] = times
    ext8, ext1 = times["extended"]["8"], times["extended"]["1"]
    days8 = PAPER["iterations"] * ext8["step_s"] * 8 / 86400
    days1 = PAPER["iterations"] * ext1["step_s"] / 86400
    old8 = PAPER["iterations"] * (ext8["step_s"] - ext8["rollout_s"] + ext8["rollout_fp32_s"]) * 8 / 86400
    data["extended_h100_days"] = {"8": days8, "1": days1, "8_fp32_rollouts": old8}
    lines += [
        "",
        f"`extended`, {PAPER['iterations']:,} iterations: {days8:.0f} H100-days on 8 GPUs "
        f"({days8 / 8:.1f} days of wall time), {days1:.0f} days on one GPU with LoRA and 8 micro-batches "
        f"(at the same MFU; LoRA saves memory, not FLOPs), against the paper's {PAPER['h100_days']} H100-days. "
        f"The no-grad rollouts are {ext8['rollout_s'] / ext8['step_s']:.0%} of a step; with them in fp32 (the "
        f"path before) it would be {old8:.0f} H100-days. The 12,500 iterations are the paper's; the recipe's "
        f"`extended` runs {recipe.extended.steps} generator updates x {recipe.extended.critic_per_gen} = "
        f"{recipe.extended.steps * recipe.extended.critic_per_gen} iterations.",
        "",
    ]
    ode = recipe.ode
    trajectory = pass_flops(Pass("forward", ode.euler_steps, 2, recipe.horizon, recipe.horizon), n)  # CFG pairs
    ode_days = ode.trajectories * trajectory / (H100_BF16 * mfu) / 86400
    grpo_default = memory("grpo", measured, replace(eight, micro=recipe.grpo.prompts_per_step), recipe)["peak"] / GiB
    k_two = memory("extended", measured, replace(eight, checkpoint_every=2), recipe)["peak"] / GiB
    lines += [
        "Notes. Checkpointing: one block of the critic's 21-frame window keeps about "
        f"{rows_block_gib(measured, recipe):.1f} GiB of activations, so checkpointing fewer blocks does not fit "
        f"(every 2nd block: {k_two:.0f} GiB for `extended` on 8 GPUs); every block it is (`--checkpoint-every 1`, "
        f"the default). GRPO: one prompt's group of {recipe.grpo.group_size} per micro-batch, "
        f"{recipe.grpo.prompts_per_step} micro-batches per GPU on 8 GPUs and "
        f"{recipe.grpo.prompts_per_step * 8} on one, {recipe.grpo.steps} steps: that needs "
        "`GRPOConfig.prompts_per_step` 1 and `--accumulate` for GRPO alone, which the recipe does not do yet; as it "
        f"is, both prompts' groups share one micro-batch and ring ({grpo_default:.0f} GiB per GPU on 8 GPUs, over the "
        f"budget). `ode`'s teacher trajectories ({ode.trajectories:,} x {ode.euler_steps} Euler steps with CFG) cost "
        f"{ode_days:.0f} H100-days more, not in its step time; a Self-Forcing checkpoint (`--checkpoint`) skips `ode` "
        "and `dmd`.",
        "",
    ]
    return "\n".join(lines), data


def rows_block_gib(measured: dict, recipe: Recipe) -> float:
    """One DiT block's saved activations for the critic's backward over one sample's K-frame window, GiB."""
    tokens = recipe.horizon * FRAME_TOKENS
    return measured["extended"]["bytes_per_token_layer_width"] * tokens * WAN.dim / GiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="runs/estimate", help="where estimate.md and estimate.json go")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed on H100 (default 0.4)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of the one-GPU setup (default 64)")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.lora_rank < 1:
        p.error(f"--lora-rank must be >= 1, got {args.lora_rank}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as run:
        measured = measure(Path(run))
    text, data = report(measured, args.mfu, args.lora_rank, record.commit())
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.md").write_text(text)
    (out / "estimate.json").write_text(json.dumps({"measured_small": measured, "computed_1.3B": data}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
