"""Context parallel for one stream: Ulysses sequence parallelism over `torch.distributed`.

One video is split over the N processes of a group (torchrun's, NCCL on GPUs, gloo on CPUs). Every rank holds the
whole model and runs the sampler on the whole latents (identical on every rank: the same seed, the same gathered
flow); inside the DiT each rank keeps 1/N of each frame's tokens for everything per token (patch embedding aside:
adaLN, projections, q/k RMSNorm over the full width, RoPE, cross-attention to the text with all heads, the FFN, the
head). Self-attention is the one place tokens meet: q, k, v [B, F*T/N, H, D] go through one all-to-all to
[B, F*T, H/N, D] (all tokens, this rank's H/N heads), attention runs over the ring KV cache, which on each rank
holds only its H/N heads (1/N of the KV memory), and a second all-to-all brings [B, F*T, H/N, D] back to
[B, F*T/N, H, D]. The head's output is all-gathered once per forward. Per layer and forward each rank sends
4 (N-1)/N^2 of the chunk's B*F*T*dim activations (q, k, v and the output, less its own share); `bench/
parallel_plan.py` turns that into bytes and milliseconds.

Ulysses rather than ring attention: the ring cache is read whole by every query of the chunk (no causal mask
inside it), so sharding it by rows would make every rank pass its share of the ring around per layer (the whole
cache through every link, per layer, per denoising step), while Ulysses moves only the chunk's q/k/v/out, about
4/N of one chunk's activations, independent of the window length. Its limit: N must divide the head count (12 at
1.3B, 40 at 14B: N = 2, 4 at 1.3B (and 3, 6, 12); 2, 4, 5, 8 at 14B) and the tokens of a frame (1560 at 832x480).

A group of one is the single-device path itself: `ContextParallel.create` returns None and the model runs without
any collective.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

SCHEMES = ("ulysses",)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the newer name first
DEFAULT_TIMEOUT_S = 120.0  # a collective waiting longer than this for a peer fails (a dead or stuck rank)


class ContextParallelError(RuntimeError):
    """A collective of the context-parallel group failed: another rank died, stopped, or timed out."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Start the default process group from torchrun's environment if it is not started yet: NCCL for a CUDA device
    (bound to the rank's LOCAL_RANK device), gloo otherwise. A collective waiting `timeout_s` for a peer fails."""
    if dist.is_initialized():
        return
    if not launched():
        raise ValueError(
            "context parallel needs its processes started together: run under torchrun (torchrun --nproc_per_node N "
            "-m sfpp generate ...), or call torch.distributed.init_process_group before the pipeline"
        )
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = rank_device(device)
        torch.cuda.set_device(kwargs["device_id"])
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def shutdown() -> None:
    """End the default process group where one was started (the end of a torchrun job)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device | str) -> torch.device:
    """A rank's device: a bare "cuda" becomes cuda:LOCAL_RANK (one GPU per process); others stay as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class ContextParallel:
    """The Ulysses split of one stream over a process group of `size` > 1 ranks (see the module's docstring).

    Token layout: rank r holds tokens [r T/N, (r+1) T/N) of every frame (T tokens per frame), so a rank's share of a
    chunk is still frame-major ([B, F*T/N, ...]) and per-frame modulation works on it unchanged."""

    def __init__(self, group: dist.ProcessGroup | None = None, scheme: str = "ulysses") -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"parallel scheme must be one of {list(SCHEMES)}, got {scheme!r}")
        self.group = group or dist.group.WORLD
        self.scheme = scheme
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    @classmethod
    def create(cls, group: dist.ProcessGroup | None = None, scheme: str = "ulysses") -> ContextParallel | None:
        """The split over `group` (default: the whole job), or None for a group of one: the single-device path."""
        if scheme not in SCHEMES:
            raise ValueError(f"parallel scheme must be one of {list(SCHEMES)}, got {scheme!r}")
        if dist.get_world_size(group or dist.group.WORLD) == 1:
            return None
        return cls(group, scheme)

    def __repr__(self) -> str:
        return f"ContextParallel({self.scheme}, rank {self.rank} of {self.size})"

    def check_heads(self, num_heads: int) -> int:
        """This rank's head count H/N; a degree that does not divide the heads is a ValueError."""
        if num_heads % self.size:
            raise ValueError(
                f"context parallel over {self.size} ranks needs a head count divisible by {self.size}, and the model "
                f"has {num_heads} heads: use a degree dividing {num_heads}"
            )
        return num_heads // self.size

    def check_tokens(self, frame_tokens: int) -> int:
        """This rank's tokens per frame T/N; T not divisible by N is a ValueError."""
        if frame_tokens % self.size:
            raise ValueError(
                f"context parallel over {self.size} ranks splits each frame's {frame_tokens} tokens evenly: choose a "
                f"height and width whose latent tokens per frame are a multiple of {self.size}"
            )
        return frame_tokens // self.size

    # --- collectives (torch's functional collectives; every rank calls each one in the same order)

    def _wait(self, what: str, fn: Callable[[], Tensor]) -> Tensor:
        if torch.compiler.is_compiling():  # traced into the graph: errors surface where the graph runs
            return funcol.wait_tensor(fn())
        try:
            return funcol.wait_tensor(fn())
        except Exception as exc:  # gloo/NCCL errors and timeouts: name what failed, on every surviving rank
            raise ContextParallelError(
                f"context parallel rank {self.rank} of {self.size}: the {what} with the other ranks failed (a rank "
                f"died, stopped, or did not answer within the group's timeout): {type(exc).__name__}: {exc}"
            ) from exc

    def all_to_all(self, x: Tensor) -> Tensor:
        """x [N, ...]: slice j goes to rank j; returns [N, ...] whose slice j came from rank j."""
        x = x.contiguous()
        return self._wait("all-to-all", lambda: funcol.all_to_all_single(x, None, None, self.group))

    def all_gather(self, x: Tensor) -> Tensor:
        """x [...] -> [N, ...]: every rank's x, by rank."""
        x = x.contiguous()
        out = self._wait("all-gather", lambda: _all_gather(x, 0, self.group))  # [N * x.shape[0], ...]
        return out.view(self.size, *x.shape)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (a seed drawn on rank 0)."""
        t = torch.tensor([value], dtype=torch.long)
        if dist.get_backend(self.group) == "nccl":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        try:
            dist.broadcast(t, dist.get_global_rank(self.group, 0), group=self.group)
        except Exception as exc:
            raise ContextParallelError(
                f"context parallel rank {self.rank} of {self.size}: the broadcast with the other ranks failed: {exc}"
            ) from exc
        return int(t.item())

    # --- the token split

    def shard(self, x: Tensor, frames: int, dim: int = 1) -> Tensor:
        """This rank's tokens of x [..., F*T, ...] (tokens at `dim`) -> [..., F*T/N, ...]."""
        x = x.unflatten(dim, (frames, self.size, -1)).select(dim + 1, self.rank)  # [..., F, T/N, ...]
        return x.flatten(dim, dim + 1)

    def gather_tokens(self, x: Tensor, frames: int) -> Tensor:
        """Every rank's share x [B, F*T/N, C] -> the whole [B, F*T, C], in token order."""
        parts = self.all_gather(x)  # [N, B, F*T/N, C]
        parts = parts.unflatten(2, (frames, -1))  # [N, B, F, T/N, C]
        return parts.permute(1, 2, 0, 3, 4).flatten(1, 3)  # [B, F*T, C]

    def heads_to_tokens(self, x: Tensor, frames: int) -> Tensor:
        """[S, B, F*T/N, H, D] (S stacked tensors, all heads of this rank's tokens) -> [S, B, F*T, H/N, D] (every
        token, this rank's heads): the all-to-all before attention."""
        s, b, _, h, d = x.shape
        send = x.unflatten(3, (self.size, h // self.size)).permute(3, 0, 1, 2, 4, 5)  # [N, S, B, F*T/N, H/N, D]
        recv = self.all_to_all(send)  # [N (source rank: its tokens), S, B, F*T/N, H/N, D]
        recv = recv.unflatten(3, (frames, -1))  # [N, S, B, F, T/N, H/N, D]
        return recv.permute(1, 2, 3, 0, 4, 5, 6).flatten(2, 4)  # [S, B, F*T, H/N, D]

    def tokens_to_heads(self, y: Tensor, frames: int) -> Tensor:
        """[B, F*T, H/N, D] -> [B, F*T/N, H, D]: the all-to-all after attention."""
        b, _, hn, d = y.shape
        send = y.unflatten(1, (frames, self.size, -1)).permute(2, 0, 1, 3, 4, 5)  # [N, B, F, T/N, H/N, D]
        recv = self.all_to_all(send)  # [N (source rank: its heads), B, F, T/N, H/N, D]
        return recv.permute(1, 2, 3, 0, 4, 5).flatten(1, 2).flatten(2, 3)  # [B, F*T/N, H, D]

    def attend(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor], frames: int):
        """Wrap a self-attention over all tokens and this rank's heads, fn(q, k, v) [B, F*T, H/N, D] -> same, into
        one over this rank's tokens and all heads, [B, F*T/N, H, D] -> same: one all-to-all for q, k and v
        stacked, one for the output."""

        def split(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, F*T/N, H, D] each
            dtype = q.dtype
            qkv = self.heads_to_tokens(torch.stack([q, k, v.to(dtype)]), frames)  # [3, B, F*T, H/N, D]
            return self.tokens_to_heads(fn(qkv[0], qkv[1], qkv[2]), frames)  # [B, F*T/N, H, D]

        return split
