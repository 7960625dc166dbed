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
import torch.nn.functional as F
from torch import Tensor

from sfpp.attention import ring_attention_ref
from sfpp.cache import quantize_fp8

OPS = ("ring_attention", "cache_write", "noise_step", "adaln_modulate")
PREFERENCE = {
    "ring_attention": ("triton", "torch"),
    "cache_write": ("triton", "cuda", "torch"),
    "noise_step": ("triton", "cuda", "torch"),
    "adaln_modulate": ("triton", "torch"),
}
_MODULE = {"adaln_modulate": "adaln"}  # the `kernels/` file of an op, where its name is not the op's


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
    if (device.type == "cuda" or interpret) and _triton(_MODULE.get(op, op)) is not None:
        found.append("triton")
    if device.type == "cuda" and "cuda" in PREFERENCE[op] and cuda_extension() is not None:
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


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """adaLN of a Wan block: fp32 LayerNorm without affine of x [B, F*L, D], per-frame modulation by shift/scale
    [B, F, 1, D] fp32 (one row per latent frame, over its L tokens), cast to out_dtype. The model's own math
    (`FP32LayerNorm`, `sfpp.model._modulate`), op for op."""
    n = F.layer_norm(x.float(), x.shape[-1:], None, None, eps)
    return (n.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2).to(out_dtype)


# ----------------------------------------------------------------------------------------------- CUDA C++ glue
# Tensors to the raw pointers, element strides and stream that csrc/bindings.cpp takes.

_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cuda_cache_write(q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index, k_cache, v_cache,
                      k_scale, v_scale, height, width, split, eps) -> Tensor:  # fmt: skip
    batch, length, _ = q.shape
    heads, d = k_cache.shape[2:]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if (
        not all(x.stride(-1) == 1 for x in (q, k, v, k_cache))
        or k_cache.stride(2) != d
        or k_cache.stride() != v_cache.stride()
    ):
        raise ValueError("cuda cache_write: q/k/v model dim and the cache head dim must be contiguous")
    if (not fp8 and k_cache.dtype != q.dtype) or q.dtype not in _CUDA_DTYPES or fp8 != (k_scale is not None):
        raise ValueError(f"cuda cache_write: unsupported dtypes q {q.dtype}, cache {k_cache.dtype}")
    frame_pos, token_index = frame_pos.long().contiguous(), token_index.long().contiguous()
    cos_table, sin_table = cos_table.float().contiguous(), sin_table.float().contiguous()
    norm_q, norm_k = norm_q.to(q.dtype).contiguous(), norm_k.to(q.dtype).contiguous()
    q_out = torch.empty(batch, length, heads, d, dtype=q.dtype, device=q.device)
    params = dict(
        q=_ptr(q), k=_ptr(k), v=_ptr(v), norm_q=_ptr(norm_q), norm_k=_ptr(norm_k), cos=_ptr(cos_table),
        sin=_ptr(sin_table), frame_pos=_ptr(frame_pos), token_index=_ptr(token_index), k_cache=_ptr(k_cache),
        v_cache=_ptr(v_cache), k_scale=_ptr(k_scale), v_scale=_ptr(v_scale), q_out=_ptr(q_out),
        batch=batch, length=length, heads=heads, head_dim=d, height=height, width=width,
        t_half=split[0] // 2, h_half=split[1] // 2,
        q_sb=q.stride(0), q_sl=q.stride(1), k_sb=k.stride(0), k_sl=k.stride(1), v_sb=v.stride(0), v_sl=v.stride(1),
        c_sb=k_cache.stride(0), c_sl=k_cache.stride(1), c_sh=k_cache.stride(2),
        s_sb=k_scale.stride(0) if fp8 else 0, s_sl=k_scale.stride(1) if fp8 else 0,
        o_sb=q_out.stride(0), o_sl=q_out.stride(1), eps=eps, dtype=_CUDA_DTYPES[q.dtype],
    )  # fmt: skip
    cuda_extension().cache_write(params, torch.cuda.current_stream(q.device).cuda_stream)
    return q_out


def _cuda_noise_step(x, flow, sigma, sigma_next, seed, offset) -> tuple[Tensor, Tensor]:
    if offset % 4 or x.dtype not in _CUDA_DTYPES or not x.is_contiguous():
        raise ValueError("cuda noise_step: offset must be a multiple of 4, x contiguous fp32/fp16/bf16")
    flow = None if flow is None else flow.to(x.dtype).contiguous()
    per_frame = isinstance(sigma_next, Tensor)
    batch, channels, frames = x.shape[:3] if x.ndim == 5 else (1, 1, 1)
    if per_frame:
        sig = sigma if isinstance(sigma, Tensor) else torch.full_like(sigma_next, float(sigma))
        sig, sig_next = (t.float().expand(batch, frames).contiguous() for t in (sig, sigma_next))
    x0, x_next = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
    frame_size = math.prod(x.shape[3:]) if x.ndim == 5 else 1
    params = dict(
        x=_ptr(x), flow=_ptr(flow), sigma=_ptr(sig) if per_frame else None,
        sigma_next=_ptr(sig_next) if per_frame else None,
        sigma_val=0.0 if per_frame else float(sigma), sigma_next_val=0.0 if per_frame else float(sigma_next),
        x0=_ptr(x0), x_next=_ptr(x_next), numel=x.numel(), frame_size=frame_size, frames=frames,
        sample_size=frame_size * frames * channels, seed=seed, counter0=offset // 4, dtype=_CUDA_DTYPES[x.dtype],
    )  # fmt: skip
    cuda_extension().noise_step(params, torch.cuda.current_stream(x.device).cuda_stream)
    return x0, x_next


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
        return _cuda_cache_write(*args, height, width, tuple(split), eps)
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
        return _cuda_noise_step(x, flow, s, s_next, seed, offset)
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


# ----------------------------------------------------------------------------------------------- adaLN modulate


@torch.library.custom_op("sfpp::adaln_modulate", mutates_args=())
def _adaln_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype, backend: str
) -> Tensor:
    fn = _triton("adaln").adaln_modulate if backend == "triton" else adaln_modulate_ref
    return fn(x, shift, scale, eps, out_dtype)


@_adaln_modulate.register_fake
def _(x, shift, scale, eps, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype)


def adaln_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype, *, backend: str = "auto"
) -> Tensor:
    """`adaln_modulate_ref` (LayerNorm + per-frame shift/scale + cast; x [B, F*L, D], shift/scale [B, F, 1, D])
    on the chosen backend."""
    backend = resolve("adaln_modulate", backend, x.device)
    return _adaln_modulate(x, shift, scale, eps, out_dtype, backend)
