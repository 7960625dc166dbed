"""Triton ring attention against the torch reference: many ring wrap-arounds, sinks on and off, ragged chunks,
poisoned empty slots and outputs, every dtype, and fp8 K/V. On CPU through Triton's interpreter (small shapes)."""

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from kernels.ring_attention import ring_attention, ring_attention_ref  # noqa: E402
from sfpp.cache import RingKVCache, dequantize_fp8, quantize_fp8  # noqa: E402
from sfpp.model import WanConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def attention_lowp(q, k, v, slot_frame, tokens):
    """Plain attention in q's dtype (scores and probabilities rounded to it), as flash-attention's tests take their
    low-precision baseline (`attention_ref(upcast=False)`)."""
    valid = (slot_frame >= 0).repeat_interleave(tokens)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    p = scores.float().masked_fill(~valid, float("-inf")).softmax(-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def check_close(out, q, kv, slot_frame, tokens, *, factor=2.0, atol=1e-5):
    """flash-attention's bound: the kernel's error against an fp64 reference is at most `factor` times plain torch's
    error in the same dtype against that reference, plus `atol`."""
    k, v = kv[:2]
    if len(kv) == 4:  # fp8: the reference attends over the dequantized cache
        k, v = dequantize_fp8(k, kv[2]), dequantize_fp8(v, kv[3])
    ref64 = ring_attention_ref(q.double(), k.double(), v.double(), slot_frame, tokens)
    lowp = attention_lowp(q, k.to(q.dtype), v.to(q.dtype), slot_frame, tokens)
    assert not out.isnan().any()
    assert max_err(out, ref64) <= factor * max_err(lowp, ref64) + atol, (max_err(out, ref64), max_err(lowp, ref64))
    return ref64


def clean(kv, slot_frame, tokens):
    """The cache with empty slots zeroed: the reference attends with a mask, and 0 * NaN would still be NaN."""
    valid = (slot_frame >= 0).repeat_interleave(tokens)[None, :, None]
    return tuple(torch.where(valid[..., None] if x.ndim == 4 else valid, x, 0).to(x.dtype) for x in kv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "window,sink,chunk,tokens,head_dim",
    [
        (5, 0, 2, 3, 16),  # ragged last chunk, no sinks
        (4, 2, 3, 5, 24),  # two sinks, window barely over a chunk, head dim not a power of two
        (3, 1, 1, 7, 32),  # frame by frame
    ],
)
def test_ring_attention_matches_reference_over_many_wraps(dtype, window, sink, chunk, tokens, head_dim):
    heads, batch = 2, 2
    cfg = WanConfig(dim=heads * head_dim, num_heads=heads, num_layers=1)
    cache = RingKVCache(
        cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink, dtype=dtype, device=DEVICE
    )
    cache.k.fill_(float("nan"))  # empty slots must never be read
    cache.v.fill_(float("nan"))
    g = torch.Generator(DEVICE).manual_seed(window * 100 + sink * 10 + chunk)
    total = 3 * window + sink + 1  # three wraps and a ragged end
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        q, k, v = (
            torch.randn(batch, n * tokens, heads, head_dim, generator=g, device=DEVICE, dtype=dtype) for _ in "qkv"
        )
        kv = cache.write(0, cache.plan(batch, n, tokens), k, v)
        out = torch.full_like(q, float("nan"))
        ring_attention(q, kv.k, kv.v, cache.slot_frame, tokens, out=out)
        check_close(out, q, clean(kv[:2], cache.slot_frame, tokens), cache.slot_frame, tokens)
        cache.advance(n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_attention_ragged_query_blocks_and_strided_inputs(dtype):
    """More queries than one block, a query count no block size divides, slots empty in the middle of the ring, and
    q/k/v as strided views of packed projections (the layout a fused QKV matmul leaves)."""
    g = torch.Generator(DEVICE).manual_seed(1)
    batch, lq, heads, d, tokens = 1, 37, 3, 16, 6
    slot_frame = torch.tensor([0, -1, 7, 8, -1, 5, 6], device=DEVICE)
    qkv = torch.randn(batch, lq, 3, heads, d, generator=g, device=DEVICE, dtype=dtype)
    kv = torch.randn(batch, 7 * tokens, 2, heads, d, generator=g, device=DEVICE, dtype=dtype)
    q, k, v = qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]
    out = ring_attention(q, k, v, slot_frame, tokens)
    check_close(out, q, clean((k, v), slot_frame, tokens), slot_frame, tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sink", [0, 2])
def test_ring_attention_fp8_kv(dtype, sink):
    """fp8 K/V dequantized in registers equals "dequantize, then the reference" (bf16 bound); the fp8 tensor-core
    path (`fp8_dot`: Q and P in fp8 too) stays within a stated bound of it and of the unquantized result."""
    g = torch.Generator(DEVICE).manual_seed(sink)
    batch, heads, d, tokens, window, chunk = 2, 2, 32, 4, 4, 2
    cfg = WanConfig(dim=heads * d, num_heads=heads, num_layers=1)
    fp8 = RingKVCache(cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink, dtype=dtype,
                      kv_dtype=torch.float8_e4m3fn, device=DEVICE)  # fmt: skip
    full = RingKVCache(cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink, dtype=dtype, device=DEVICE)
    for _ in range(2 * window // chunk + 1):  # past two wraps
        q, k, v = (torch.randn(batch, chunk * tokens, heads, d, generator=g, device=DEVICE, dtype=dtype) for _ in "qkv")
        kv8 = fp8.write(0, fp8.plan(batch, chunk, tokens), k, v)
        kv = full.write(0, full.plan(batch, chunk, tokens), k, v)
        sf = fp8.slot_frame
        out = ring_attention(q, *kv8[:2], sf, tokens, *kv8[2:])
        ref_dq = check_close(out, q, kv8, sf, tokens, factor=3.0)  # P * v_scale is rounded once more than P
        ref = ring_attention_ref(q.double(), kv.k.double(), kv.v.double(), sf, tokens)
        # fp8 K/V alone: a relative error of 2^-4 per element, averaging out over D and the keys
        assert max_err(out, ref) < 0.08 * ref.abs().max().item()
        if dtype != torch.float32:
            out_dot = ring_attention(q, *kv8[:2], sf, tokens, *kv8[2:], fp8_dot=True)
            rms = ref.pow(2).mean().sqrt().item()
            assert (out_dot.double() - ref_dq).pow(2).mean().sqrt().item() < 0.05 * rms
            assert (out_dot.double() - ref).pow(2).mean().sqrt().item() < 0.07 * rms
            assert max_err(out_dot, ref) < 0.25 * ref.abs().max().item()
        fp8.advance(chunk)
        full.advance(chunk)


def test_fp8_quantization_round_trip():
    x = torch.randn(3, 5, 2, 16, generator=torch.Generator().manual_seed(0)) * torch.rand(3, 5, 2, 1) * 10
    x8, scale = quantize_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    assert torch.equal(x8.float().abs().amax(-1), torch.full_like(scale, 448.0))  # each row uses the full range
    rel = (dequantize_fp8(x8, scale) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert rel.max() <= 2**-4 * 448 / 256 + 1e-6  # half an ulp at the top binade [256, 448], relative to the max


def test_ring_attention_rejects_mismatched_inputs():
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="does not match"):
        ring_attention(q, k, k, torch.tensor([0, 1, 2]), 4)
    with pytest.raises(ValueError, match="differs"):
        ring_attention(q, k.half(), k.half(), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="fp8"):
        ring_attention(q, k.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), torch.tensor([0, 1]), 4)
