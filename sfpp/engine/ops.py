"""Per-op dispatch of the chunk-step kernels: torch (the references in `sfpp.kernels.reference`, run anywhere),
triton (`sfpp/kernels/`) or cuda (the CUDA C++ extension built from `csrc/`, for the ops that have one). Each op is a
`torch.library` custom op, so torch.compile and CUDA graphs treat it as one opaque call; the backend is an argument
of the op.

backend="auto" on a GPU takes the backend measured fastest on this GPU model, read from `dispatch_table.json`
(written by the per-op benchmarks in `bench/`, keyed by `torch.cuda.get_device_name()`); for a GPU without an entry
it takes Triton, whose launches CI compiles for sm_90 and sm_80 (tests/test_compile_targets.py). On a CPU "auto" is
the torch reference (the Triton interpreter is for tests, not speed). backend="cuda" runs the CUDA C++ kernel where
the op has one and Triton otherwise, so `WanModel.use_kernels("cuda")` covers every op.
"""

import functools
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from sfpp.kernels.reference import adaln_modulate_ref, cache_write_ref, ring_attention_ref

BACKENDS = {  # the implementations of each op
    "ring_attention": ("torch", "triton"),
    "cache_write": ("torch", "triton", "cuda"),
    "adaln_modulate": ("torch", "triton"),
}
OPS = tuple(BACKENDS)
DISPATCH_TABLE = Path(__file__).with_name("dispatch_table.json")


@functools.cache
def _triton(op: str):
    """The Triton module of `op`, or None without Triton (it is imported on first use only: Triton binds its
    kernels to the interpreter or not when first imported, so a script may set TRITON_INTERPRET after `import sfpp`)."""
    try:
        if op == "ring_attention":
            from sfpp.kernels import ring_attention as module
        elif op == "cache_write":
            from sfpp.kernels import cache_write as module
        else:
            from sfpp.kernels import adaln as module
    except ImportError:
        return None
    return module


@functools.cache
def cuda_extension():
    """The compiled CUDA C++ ops (`sfpp.kernels._cuda_ops`), or None where they were not built."""
    try:
        from sfpp.kernels import _cuda_ops
    except ImportError:
        return None
    return _cuda_ops


def available(op: str, device: torch.device) -> list[str]:
    found = ["torch"]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if (device.type == "cuda" or interpret) and _triton(op) is not None:
        found.append("triton")
    if device.type == "cuda" and "cuda" in BACKENDS[op] and cuda_extension() is not None:
        found.append("cuda")
    return found


@functools.cache
def load_dispatch_table(path: Path | None = None) -> dict:
    """{GPU name: {op: {"backend": fastest, "ms": {backend: ms}, ...}}} (an fp8-cache variant of an op is keyed
    "<op>:fp8"); empty where no GPU run has written one."""
    path = path or DISPATCH_TABLE
    return json.loads(path.read_text()) if path.exists() else {}


def write_dispatch_table(op: str, device_name: str, ms: dict[str, float], meta: dict, path: Path | None = None) -> str:
    """Record one measurement (milliseconds per backend, and how it was taken) for a GPU model; returns the
    fastest backend, which "auto" takes on that GPU model from now on. Called by the per-op benchmarks."""
    path = path or DISPATCH_TABLE
    timed = {b: t for b, t in ms.items() if t == t and t > 0}  # drop NaN and failures
    if not timed:
        raise ValueError(f"no valid timing for {op} on {device_name}: {ms}")
    fastest = min(timed, key=timed.get)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device_name, {})[op] = {"backend": fastest, "ms": timed, **meta}
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    load_dispatch_table.cache_clear()
    return fastest


def _key(op: str, fp8: bool) -> str:
    return f"{op}:fp8" if fp8 else op


def measured(op: str, device: torch.device, fp8: bool = False) -> dict | None:
    """The dispatch table's entry of `op` (with an fp8 K/V cache or not) for this device's GPU model, or None."""
    if device.type != "cuda":
        return None
    return load_dispatch_table().get(torch.cuda.get_device_name(device), {}).get(_key(op, fp8))


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result (torch.compile decides once, at trace time, and keeps the op opaque)
    without importing torch._dynamo, and with it Triton, when sfpp is imported: Triton binds its kernels to the
    interpreter or not when it is first imported, so a script must be able to set TRITON_INTERPRET after that."""
    fn._dynamo_marked_constant = True  # all that torch._dynamo.assume_constant_result does
    return fn


@_assume_constant_result
def resolve(op: str, backend: str, device: torch.device, fp8: bool = False) -> str:
    """The backend that runs `op` on `device` (`fp8`: over an fp8 K/V cache): `backend` itself, or for "auto" the
    measured fastest on this GPU model (`dispatch_table.json`), else Triton on a GPU and torch on a CPU."""
    if op not in BACKENDS:
        raise ValueError(f"unknown op {op!r}; ops are {list(BACKENDS)}")
    have = available(op, device)
    if fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9) and "triton" in have:
        have.remove("triton")  # Triton has no e4m3 before sm_89
    if backend == "auto":
        entry = measured(op, device, fp8)
        if entry is not None and entry.get("backend") in have:
            return entry["backend"]
        if device.type == "cuda" and "triton" in have:
            return "triton"
        return "cuda" if "cuda" in have else "torch"
    if backend == "cuda" and "cuda" not in BACKENDS[op]:
        backend = "triton"  # no CUDA C++ version of this op: its Triton kernel
    if backend not in have:
        raise ValueError(f"backend {backend!r} for {op} is not available on {device.type} (available: {have})")
    return backend


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
    if not all(x.stride(-1) == 1 for x in (q, k, v, k_cache)) or k_cache.shape != v_cache.shape:
        raise ValueError("cuda cache_write: q/k/v model dim and the K cache head dim must be contiguous")
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
        cv_sb=v_cache.stride(0), cv_sl=v_cache.stride(1), cv_sh=v_cache.stride(2), cv_sd=v_cache.stride(3),
        s_sb=k_scale.stride(0) if fp8 else 0, s_sl=k_scale.stride(1) if fp8 else 0,
        o_sb=q_out.stride(0), o_sl=q_out.stride(1), eps=eps, dtype=_CUDA_DTYPES[q.dtype],
    )  # fmt: skip
    cuda_extension().cache_write(params, torch.cuda.current_stream(q.device).cuda_stream)
    return q_out


# ----------------------------------------------------------------------------------------------- ring attention


@torch.library.custom_op("sfpp::ring_attention", mutates_args=())
def _ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid_rows: Tensor,
    valid_rows_host: int,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    backend: str,
) -> Tensor:
    if backend == "triton":
        module = _triton("ring_attention")
        entry = measured("ring_attention", q.device, k_cache.dtype == torch.float8_e4m3fn)
        tile = module.TILES.get(entry.get("tile")) if entry else None
        return module.ring_attention(q, k_cache, v_cache, valid_rows, k_scale, v_scale, tile=tile)
    return ring_attention_ref(q, k_cache, v_cache, valid_rows_host, k_scale, v_scale).contiguous()


@_ring_attention.register_fake
def _(q, k_cache, v_cache, valid_rows, valid_rows_host, k_scale, v_scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def ring_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid_rows: Tensor,
    valid_rows_host: int,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Attention of q [B, Lq, H, D] over the first rows of the ring cache [B, S*T, H, D] (fp8 with scales
    [B, S*T, H], or None): `sfpp.kernels.reference.ring_attention_ref` on the chosen backend. The valid prefix
    comes twice, as `ChunkPlan` has it: valid_rows, a 0-dim device tensor (the Triton kernel reads it on the
    device, so one CUDA graph serves every fill level), and valid_rows_host, the same number as an int (torch slices
    by it: SDPA with no mask, static shapes per fill level)."""
    backend = resolve("ring_attention", backend, q.device, k_cache.dtype == torch.float8_e4m3fn)
    return _ring_attention(q, k_cache, v_cache, valid_rows, valid_rows_host, k_scale, v_scale, backend)


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
    """`cache_write_ref` (q/k RMSNorm + RoPE + ring append, fp8 optional) on the chosen backend."""
    backend = resolve("cache_write", backend, q.device, k_cache.dtype == torch.float8_e4m3fn)
    args = (q, k, v, norm_q, norm_k, cos_table, sin_table, frame_pos, token_index, k_cache, v_cache, k_scale, v_scale)
    return _cache_write(*args, height, width, list(split), eps, backend)


# ----------------------------------------------------------------------------------------------- adaLN modulate


@torch.library.custom_op("sfpp::adaln_modulate", mutates_args=())
def _adaln_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype, backend: str
) -> Tensor:
    fn = _triton("adaln_modulate").adaln_modulate if backend == "triton" else adaln_modulate_ref
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
