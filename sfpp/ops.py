"""Per-op dispatch of the chunk-step kernels: torch (reference, runs anywhere), triton (`kernels/`) or cuda (the
CUDA C++ extension built from `csrc/`). Each op is a `torch.library` custom op, so torch.compile and CUDA graphs
treat it as one opaque call; the backend is an argument of the op.

backend="auto" takes the first available of `PREFERENCE[op]` for the device: compiled kernels on a GPU, the torch
reference on a CPU. Override per op with SFPP_BACKEND_<OP>=torch|triton|cuda (e.g. SFPP_BACKEND_NOISE_STEP=cuda).
The order is a default until `bench/` has measured both kernels on the target GPU.
"""

import functools
import importlib
import math
import os

import torch
from torch import Tensor

from sfpp.attention import ring_attention_ref
from sfpp.cache import quantize_fp8

OPS = ("ring_attention", "cache_write", "noise_step")
PREFERENCE = {
    "ring_attention": ("triton", "torch"),
    "cache_write": ("triton", "cuda", "torch"),
    "noise_step": ("triton", "cuda", "torch"),
}


@functools.cache
def _triton(module: str):
    try:
        return importlib.import_module(f"kernels.{module}")
    except ImportError:
        return None


@functools.cache
def cuda_extension():
    """The compiled CUDA C++ ops (`sfpp._cuda_ops`), or None where they were not built."""
    try:
        return importlib.import_module("sfpp._cuda_ops")
    except ImportError:
        return None


def available(op: str, device: torch.device) -> list[str]:
    found = ["torch"]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if (device.type == "cuda" or interpret) and _triton(op) is not None:
        found.append("triton")
    if device.type == "cuda" and op != "ring_attention" and cuda_extension() is not None:
        found.append("cuda")
    return found


@torch.compiler.assume_constant_result  # torch.compile decides once, at trace time, and keeps the op opaque
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`: `backend` itself, or for "auto" the env override or the first
    available of PREFERENCE (on a CPU that is torch: the interpreter is for tests, not speed)."""
    have = available(op, device)
    if backend == "auto":
        backend = os.environ.get(f"SFPP_BACKEND_{op.upper()}", "auto")
        if backend == "auto":
            return next(b for b in PREFERENCE[op] if b in have and (device.type == "cuda" or b == "torch"))
    if backend not in have:
        raise ValueError(f"backend {backend!r} for {op} is not available on {device.type} (available: {have})")
    return backend


# ----------------------------------------------------------------------------------------------- torch references
# The meaning of each op; the kernels in `kernels/` import these and are tested against them.

_M32 = 0xFFFFFFFF


def rope_rows(num_tokens: int, frame_pos: Tensor, height: int, width: int, split: tuple[int, int, int]) -> Tensor:
    """Row of the RoPE table each (token, rotation pair) reads [L, D/2]: the frame's absolute position for the
    t pairs, the token's row y for the h pairs, its column x for the w pairs (split in real dims, as WanConfig)."""
    t_half, h_half, w_half = (s // 2 for s in split)
    token = torch.arange(num_tokens, device=frame_pos.device)
    f, y, x = token // (height * width), token // width % height, token % width
    pair = torch.arange(t_half + h_half + w_half, device=frame_pos.device)
    return torch.where(
        pair < t_half, frame_pos[f][:, None], torch.where(pair < t_half + h_half, y[:, None], x[:, None])
    )


def _norm_rope_ref(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, heads: int, eps: float) -> Tensor:
    """Wan's RMSNorm over the model dim, then RoPE on adjacent pairs; [B, L, dim] -> [B, L, H, D]."""
    x32 = x.float()
    x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    pairs = x.unflatten(-1, (heads, -1, 2)).float()
    c, s = cos[None, :, None], sin[None, :, None]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).to(weight.dtype)


def cache_write_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_q: Tensor,
    norm_k: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    frame_pos: Tensor,
    token_index: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    height: int,
    width: int,
    split: tuple[int, int, int],
    eps: float,
) -> Tensor:
    """q, k, v [B, L, H*D] projections of the chunk (L = Fc*height*width tokens); norm_q/norm_k [H*D] RMSNorm
    weights; cos_table/sin_table [P, D/2] fp32 (`rope_table`); frame_pos [Fc]; token_index [L] the cache rows of
    the chunk; k_cache/v_cache [B, S*T, H, D] (fp8 with k_scale/v_scale [B, S*T, H], or None). Writes normed,
    roped K and V into the cache rows and returns the normed, roped q [B, L, H, D]."""
    heads = k_cache.shape[2]
    rows = rope_rows(q.shape[1], frame_pos, height, width, split)
    pair = torch.arange(rows.shape[1], device=rows.device)
    cos, sin = cos_table[rows, pair], sin_table[rows, pair]  # [L, D/2]
    q_out = _norm_rope_ref(q, norm_q, cos, sin, heads, eps)
    k_out = _norm_rope_ref(k, norm_k, cos, sin, heads, eps)
    v_out = v.unflatten(-1, (heads, -1))
    if k_scale is not None:
        (k_out, ks), (v_out, vs) = quantize_fp8(k_out), quantize_fp8(v_out)
        k_scale.index_copy_(1, token_index, ks)
        v_scale.index_copy_(1, token_index, vs)
        k_cache, v_cache, k_out, v_out = (x.view(torch.uint8) for x in (k_cache, v_cache, k_out, v_out))
    k_cache.index_copy_(1, token_index, k_out.to(k_cache.dtype))
    v_cache.index_copy_(1, token_index, v_out.to(v_cache.dtype))
    return q_out


def _mul32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for a int64 tensor of uint32 values, without overflowing int64."""
    p_lo, p_hi = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low >> 32), low & _M32


def philox4x32_ref(counter: Tensor, seed: int) -> list[Tensor]:
    """Philox4x32-10 of counters (c lo, c hi, 0, 0) under key (seed lo, seed hi): four uint32 words (as int64)."""
    c = [counter & _M32, counter >> 32, torch.zeros_like(counter), torch.zeros_like(counter)]
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul32(c[2], 0xCD9E8D57)
        hi_a, lo_a = _mul32(c[0], 0xD2511F53)
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c


def philox_normal_ref(numel: int, seed: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """The kernels' noise, in torch: `numel` standard normals (fp32) of stream `seed` from element `offset`."""
    if offset % 4:
        raise ValueError(f"the noise offset must be a multiple of 4, got {offset}")
    counter = torch.arange(offset // 4, (offset + numel + 3) // 4, device=device, dtype=torch.int64)
    u = [((w >> 8).float() + 0.5) * 2.0**-24 for w in philox4x32_ref(counter, seed)]
    normals = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r, theta = torch.sqrt(-2.0 * torch.log(a)), (2 * math.pi) * b
        normals += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(normals, -1).flatten()[:numel]


def _per_frame(sigma: float | Tensor, x: Tensor) -> float | Tensor:
    if not isinstance(sigma, Tensor):
        return sigma
    return sigma.float().expand(x.shape[0], x.shape[2])[:, None, :, None, None]


def noise_step_ref(
    x: Tensor, flow: Tensor | None, sigma: float | Tensor, sigma_next: float | Tensor, seed: int, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """x [B, C, F, H, W] at noise level sigma, flow the model's v = noise - x0 (None: x is already x0).
    Returns (x0, x_next) in fp32."""
    x0 = x.float() if flow is None else x.float() - _per_frame(sigma, x) * flow.float()
    noise = philox_normal_ref(x.numel(), seed, offset, x.device).view(x.shape)
    s = _per_frame(sigma_next, x)
    return x0, (1 - s) * x0 + s * noise


# ----------------------------------------------------------------------------------------------- ring attention


@torch.library.custom_op("sfpp::ring_attention", mutates_args=())
def _ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    frame_tokens: int,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    backend: str,
    fp8_dot: bool,
) -> Tensor:
    if backend == "triton":
        kernel = _triton("ring_attention").ring_attention
        return kernel(q, k_cache, v_cache, slot_frame, frame_tokens, k_scale, v_scale, fp8_dot=fp8_dot)
    return ring_attention_ref(q, k_cache, v_cache, slot_frame, frame_tokens, k_scale, v_scale).contiguous()


@_ring_attention.register_fake
def _(q, k_cache, v_cache, slot_frame, frame_tokens, k_scale, v_scale, backend, fp8_dot):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_frame: Tensor,
    frame_tokens: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    *,
    backend: str = "auto",
    fp8_dot: bool = False,
) -> Tensor:
    """`sfpp.attention.ring_attention_ref` on the chosen backend. fp8_dot (fp8 cache, triton only) also runs
    both matmuls on fp8 tensor cores."""
    backend = resolve("ring_attention", backend, q.device)
    return _ring_attention(q, k_cache, v_cache, slot_frame, frame_tokens, k_scale, v_scale, backend, fp8_dot)


# ----------------------------------------------------------------------------------------------- cache write


@torch.library.custom_op("sfpp::cache_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _cache_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_q: Tensor,
    norm_k: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    frame_pos: Tensor,
    token_index: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    height: int,
    width: int,
    split: list[int],
    eps: float,
    backend: str,
) -> Tensor:
    args = (q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index, k_cache, v_cache, k_scale, v_scale)
    if backend == "cuda":
        from sfpp import _cuda_launch

        return _cuda_launch.cache_write(*args, height, width, tuple(split), eps)
    fn = _triton("cache_write").cache_write if backend == "triton" else cache_write_ref
    return fn(*args, height, width, tuple(split), eps)


@_cache_write.register_fake
def _(q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index, k_cache, v_cache, *rest):
    return q.new_empty((*q.shape[:2], k_cache.shape[2], k_cache.shape[3]))


def cache_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_q: Tensor,
    norm_k: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    frame_pos: Tensor,
    token_index: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    height: int,
    width: int,
    split: tuple[int, int, int],
    eps: float,
    *,
    backend: str = "auto",
) -> Tensor:
    """`kernels.cache_write_ref.cache_write` (RMSNorm + RoPE + ring append, fp8 optional) on the chosen backend."""
    backend = resolve("cache_write", backend, q.device)
    args = (q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index, k_cache, v_cache, k_scale, v_scale)
    return _cache_write(*args, height, width, list(split), eps, backend)


# ----------------------------------------------------------------------------------------------- noise step


@torch.library.custom_op("sfpp::noise_step", mutates_args=())
def _noise_step(
    x: Tensor,
    flow: Tensor | None,
    sigma: float,
    sigma_next: float,
    sigma_frames: Tensor | None,
    sigma_next_frames: Tensor | None,
    seed: int,
    offset: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    s = sigma if sigma_frames is None else sigma_frames
    s_next = sigma_next if sigma_next_frames is None else sigma_next_frames
    if backend == "cuda":
        from sfpp import _cuda_launch

        return _cuda_launch.noise_step(x, flow, s, s_next, seed, offset)
    fn = _triton("noise_step").noise_step if backend == "triton" else noise_step_ref
    return fn(x, flow, s, s_next, seed, offset)


@_noise_step.register_fake
def _(x, flow, sigma, sigma_next, sigma_frames, sigma_next_frames, seed, offset, backend):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=torch.float32)


def noise_step(
    x: Tensor,
    flow: Tensor | None,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    seed: int,
    offset: int = 0,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(x0, x_next) of `kernels.noise_step.noise_step_ref` on the chosen backend; sigmas are floats or per-frame
    tensors [B, F]; flow=None is the backward noise initialization (x is x0)."""
    backend = resolve("noise_step", backend, x.device)
    frames = [s if isinstance(s, Tensor) else None for s in (sigma, sigma_next)]
    floats = [0.0 if isinstance(s, Tensor) else float(s) for s in (sigma, sigma_next)]
    return _noise_step(x, flow, *floats, *frames, seed, offset, backend)
