"""What every stage shares: the process group, FSDP2 sharding, rank-0 logging, EMA, and crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from sfpp.models.checkpoint import CheckpointError, check_state_dict, load_file


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one: NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world_size == 1:
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _process_group(env: Dist) -> None:
    """FSDP2 needs a process group; one process gets a group of one (in memory, no rendezvous), so the same policy
    runs unsharded there."""
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(module: nn.Module, env: Dist, forward_methods: tuple[str, ...] = (), dtype: str = "float32") -> nn.Module:
    """FSDP2 over all ranks in torchtitan's order: one unit per DiT block (each gathers only its own weights, just in
    time), then the root for what is left (embeddings, head). `forward_methods` are entry points other than forward
    (e.g. forward_chunk, text_kv) that must unshard parameters; each block serves `text_kv` for its layer.

    dtype "bfloat16": FSDP2's MixedPrecisionPolicy, as Self-Forcing and torchtitan train: the sharded parameters,
    their gradients and the AdamW state stay fp32 (the master weights); each unit is gathered in bf16 and computes
    in bf16; gradients are reduced in fp32. Inputs are not cast (`cast_forward_inputs=False`): the DiT keeps its
    residual stream and modulation in fp32 and casts to its weights' dtype itself, as at inference. On one process
    the same policy runs over a group of one (nothing is split). fp32 on one process: the plain module."""
    if env.world_size == 1 and dtype == "float32":
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    _process_group(env)
    param_dtype = compute_dtype(dtype)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in getattr(module, "blocks", ()):
        fully_shard(block, mp_policy=policy)
        register_fsdp_forward_method(block, "text_kv")  # called by the root, not through the block's forward
    fully_shard(module, mp_policy=policy)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    return module


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (collective under FSDP; complete on rank 0)."""
    return get_model_state_dict(module, options=_FULL)


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    check_state_dict(module, state, source=source)  # a DTensor's .shape is its full shape: works sharded too
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def weights_checksum(module: nn.Module) -> float:
    """A float summary of the full weights, identical on every rank iff the ranks hold the same model."""
    total = 0.0
    for i, (_, p) in enumerate(sorted(module.state_dict().items())):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        total += float((full.double() * (1 + (i % 7))).sum())
    return total


class EMA:
    """Exponential moving average of a model's parameters (sharded like the model under FSDP)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay  # of the trained parameters only (with LoRA: the adapters; the base does not move)
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - d)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone() for n, t in self.shadow.items()}

    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            src = state[n].to(t.device if not isinstance(t, DTensor) else t.to_local().device)
            if isinstance(t, DTensor):
                src = torch.distributed.tensor.distribute_tensor(src, t.device_mesh, t.placements)
            t.copy_(src)


class Logger:
    """Loss lines and a progress bar on rank 0 only."""

    def __init__(self, env: Dist, stage: str, total: int, start: int, every: int) -> None:
        self.env, self.stage, self.every, self.t0 = env, stage, every, time.time()
        self.bar = None
        if env.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", leave=False, mininterval=2)

    def log(self, step: int, losses: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if (step + 1) % self.every == 0:
            text = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            self.bar.write(f"[{self.stage}] step {step + 1} {text} ({time.time() - self.t0:.0f}s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def info(env: Dist, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------ checkpoints
#
# <stage>/ckpt/step_000100/{<model>.safetensors, state.pt}, and <stage>/ckpt/LATEST naming the newest complete one.
# A checkpoint is written into a temporary folder, renamed into place, and only then named in LATEST (both renames
# are atomic): a crash at any point leaves the previous checkpoint intact and LATEST pointing at it.


def save_checkpoint(
    ckpt_dir: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict, env: Dist, keep: int = 2
) -> None:
    if not env.is_main:
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for model_name, sd in weights.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / f"{model_name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = ckpt_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".LATEST.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, ckpt_dir / "LATEST")
    older = sorted(p for p in ckpt_dir.glob("step_*") if p.name < name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, model_names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """The newest complete checkpoint, or None if there is none. A damaged one raises CheckpointError."""
    latest = ckpt_dir / "LATEST"
    if not latest.is_file():
        return None
    folder = ckpt_dir / latest.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names {folder.name}, which does not exist")
    weights = {name: load_file(folder / f"{name}.safetensors") for name in model_names}
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"could not read {folder / 'state.pt'}: {exc}") from exc
    return weights, state


def optimizer_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optim, options=_FULL)


def load_optimizer_state(model: nn.Module, optim: torch.optim.Optimizer, state: dict) -> None:
    # Not strict: parameters that never received a gradient (e.g. the student's text K/V path, which training
    # keeps fixed) have no optimizer state to restore.
    set_optimizer_state_dict(model, optim, state, options=StateDictOptions(full_state_dict=True, strict=False))


def write_json(path: Path, data: dict, env: Dist) -> None:
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
