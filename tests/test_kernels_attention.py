"""Triton ring attention against the torch reference: the valid prefix of the ring over every fill level and many
wrap-arounds, sinks on and off, ragged chunks and tiles, poisoned rows past the prefix and poisoned outputs, every
dtype, every production tile configuration, and fp8 K/V on fp8 tensor cores. On CPU through Triton's interpreter."""

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from sfpp.engine.cache import RingKVCache  # noqa: E402
from sfpp.kernels.fp8 import dequantize_fp8, quantize_fp8  # noqa: E402
from sfpp.kernels.reference import ring_attention_ref  # noqa: E402
from sfpp.kernels.ring_attention import TILES, ring_attention  # noqa: E402
from sfpp.models.dit import WanConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def attention_lowp(q, k, v):
    """Plain attention in q's dtype (scores and probabilities rounded to it), as flash-attention's tests take their
    low-precision baseline (`attention_ref(upcast=False)`)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    p = scores.float().softmax(-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def check_close(out, q, k, v, rows, *, factor=2.0, atol=1e-5):
    """flash-attention's bound: the kernel's error against an fp64 reference is at most `factor` times plain torch's
    error in the same dtype against that reference, plus `atol`. k, v: the cache in q's dtype."""
    ref64 = ring_attention_ref(q.double(), k.double(), v.double(), rows)
    lowp = attention_lowp(q, k[:, :rows], v[:, :rows])
    assert not out.isnan().any()
    assert max_err(out, ref64) <= factor * max_err(lowp, ref64) + atol, (max_err(out, ref64), max_err(lowp, ref64))
    return ref64


def poisoned_cache(cfg, dtype, kv_dtype=None, **kw):
    cache = RingKVCache(cfg, dtype=dtype, kv_dtype=kv_dtype, device=DEVICE, **kw)
    for buf in (cache.k, cache.v):  # rows past the valid prefix must never be read
        buf.view(torch.uint8).fill_(0x7F)  # NaN in fp32/fp16/bf16 and in e4m3
    return cache


def test_valid_rows_are_a_prefix_of_the_ring_at_every_fill_level():
    """What the kernels rely on: slots fill in order, so the slots holding frames are exactly the first
    valid_rows / T, and the device and host counts agree, while filling and after any number of wraps."""
    cfg = WanConfig(dim=32, num_heads=2, num_layers=1)
    for window, sink, chunk in [(5, 0, 2), (4, 2, 3), (7, 1, 3), (3, 0, 1)]:
        cache = RingKVCache(cfg, batch_size=1, frame_tokens=3, window=window, sink=sink)
        for _ in range(4 * (window + sink)):
            plan = cache.plan(1, chunk, 3)
            slots = plan.valid_rows_host // 3
            assert plan.valid_rows.item() == plan.valid_rows_host == min(cache.frames_done + chunk, sink + window) * 3
            assert (cache.slot_frame[:slots] >= 0).all() and (cache.slot_frame[slots:] == -1).all()
            cache.advance(chunk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "window,sink,chunk,tokens,head_dim",
    [
        (5, 0, 2, 3, 16),  # ragged last chunk, no sinks
        (4, 2, 3, 5, 24),  # two sinks, window barely over a chunk, head dim not a power of two
        (3, 1, 1, 7, 32),  # frame by frame
    ],
)
def test_ring_attention_matches_reference_over_fill_levels_and_wraps(dtype, window, sink, chunk, tokens, head_dim):
    heads, batch = 2, 2
    cfg = WanConfig(dim=heads * head_dim, num_heads=heads, num_layers=1)
    cache = poisoned_cache(cfg, dtype, batch_size=batch, frame_tokens=tokens, window=window, sink=sink)
    g = torch.Generator(DEVICE).manual_seed(window * 100 + sink * 10 + chunk)
    total = 3 * window + sink + 1  # the fill levels, three wraps and a ragged end
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        q, k, v = (
            torch.randn(batch, n * tokens, heads, head_dim, generator=g, device=DEVICE, dtype=dtype) for _ in "qkv"
        )
        plan = cache.plan(batch, n, tokens)
        kv = cache.write(0, plan, k, v)
        out = torch.full_like(q, float("nan"))
        ring_attention(q, kv.k, kv.v, plan.valid_rows, out=out)
        check_close(out, q, kv.k, kv.v, plan.valid_rows_host)
        cache.advance(n)


def rows_contiguous(x):
    """x [B, N, H, D] in the fp8 cache's V layout (rows contiguous, as `RingKVCache` stores an fp8 V)."""
    out = torch.empty(x.shape[0], *x.shape[2:], x.shape[1], dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    out.view(torch.uint8).copy_(x.view(torch.uint8))
    return out


@pytest.mark.parametrize("tile", [name for name in TILES if name != "interpreter"])
def test_ring_attention_production_tiles(tile):
    """The GPU tile configurations (several query blocks, full key tiles and a ragged one), head dim 128, bf16 and
    fp8 K/V (fp32 for the fp32 tile)."""
    g = torch.Generator(DEVICE).manual_seed(3)
    batch, lq, heads, d, rows = 1, 150, 2, 128, 300
    dtype = torch.float32 if tile == "fp32" else torch.bfloat16
    q = torch.randn(batch, lq, heads, d, generator=g, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, 400, heads, d, generator=g, device=DEVICE, dtype=dtype) for _ in "kv")
    valid = torch.tensor(rows, device=DEVICE)
    ref = ring_attention_ref(q.double(), k.double(), v.double(), rows)
    if tile == "hopper_fp8":
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        k8[:, rows:], v8[:, rows:] = float("nan"), float("nan")
        out = ring_attention(q, k8, rows_contiguous(v8), valid, ks, vs, tile=TILES[tile])
        ref_dq = ring_attention_ref(q.double(), dequantize_fp8(k8, ks).double(), dequantize_fp8(v8, vs).double(), rows)
        rms = ref.pow(2).mean().sqrt().item()
        # The products cost ~0.2% of the output (Q and P as two fp8 terms); the cache's own rounding ~3.7%
        assert (out.double() - ref_dq).pow(2).mean().sqrt().item() < 0.01 * rms
        assert (out.double() - ref).pow(2).mean().sqrt().item() < 0.05 * rms
        return
    k[:, rows:], v[:, rows:] = float("nan"), float("nan")
    out = ring_attention(q, k, v, valid, tile=TILES[tile])
    check_close(out, q, k, v, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_attention_ragged_query_blocks_and_strided_inputs(dtype):
    """More queries than one block, a query count no block size divides, a prefix no tile size divides, and q/k/v
    as strided views of packed projections (the layout a fused QKV matmul leaves)."""
    g = torch.Generator(DEVICE).manual_seed(1)
    batch, lq, heads, d, rows = 1, 37, 3, 16, 29
    qkv = torch.randn(batch, lq, 3, heads, d, generator=g, device=DEVICE, dtype=dtype)
    kv = torch.randn(batch, 42, 2, heads, d, generator=g, device=DEVICE, dtype=dtype)
    q, k, v = qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]
    out = ring_attention(q, k, v, torch.tensor(rows, device=DEVICE))
    check_close(out, q, k, v, rows)


def test_valid_rows_is_read_on_the_device():
    """One launch configuration serves every fill level: changing the tensor's value in place changes the result
    (what a replayed CUDA graph relies on)."""
    g = torch.Generator(DEVICE).manual_seed(2)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g, device=DEVICE) for _ in "qkv")
    valid = torch.tensor(7, device=DEVICE)
    first = ring_attention(q, k, v, valid)
    valid.fill_(20)
    second = ring_attention(q, k, v, valid)
    torch.testing.assert_close(first, ring_attention_ref(q, k, v, 7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, ring_attention_ref(q, k, v, 20), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sink", [0, 2])
def test_ring_attention_fp8_kv(dtype, sink):
    """fp8 K/V on fp8 tensor cores (Q and P quantized in-kernel, two fp8 terms each), V's rows contiguous as the
    cache stores them: within a stated bound of "dequantize, then the reference" and of the unquantized result, over
    fill levels and two wraps."""
    g = torch.Generator(DEVICE).manual_seed(sink)
    batch, heads, d, tokens, window, chunk = 2, 2, 32, 4, 4, 2
    cfg = WanConfig(dim=heads * d, num_heads=heads, num_layers=1)
    fp8 = poisoned_cache(cfg, dtype, torch.float8_e4m3fn, batch_size=batch, frame_tokens=tokens, window=window,
                         sink=sink)  # fmt: skip
    full = RingKVCache(cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink, dtype=dtype, device=DEVICE)
    assert fp8.v.stride(2) == 1  # rows contiguous
    for _ in range(2 * window // chunk + 1):
        q, k, v = (torch.randn(batch, chunk * tokens, heads, d, generator=g, device=DEVICE, dtype=dtype) for _ in "qkv")
        plan = fp8.plan(batch, chunk, tokens)
        kv8 = fp8.write(0, plan, k, v)
        kv = full.write(0, full.plan(batch, chunk, tokens), k, v)
        rows = plan.valid_rows_host
        out = ring_attention(q, *kv8[:2], plan.valid_rows, *kv8[2:])
        assert not out.isnan().any()
        k_dq = dequantize_fp8(kv8.k[:, :rows], kv8.k_scale[:, :rows]).double()
        v_dq = dequantize_fp8(kv8.v[:, :rows], kv8.v_scale[:, :rows]).double()
        ref_dq = ring_attention_ref(q.double(), k_dq, v_dq, rows)
        ref = ring_attention_ref(q.double(), kv.k.double(), kv.v.double(), rows)
        rms = ref.pow(2).mean().sqrt().item()
        assert (out.double() - ref_dq).pow(2).mean().sqrt().item() < 0.01 * rms
        assert (out.double() - ref).pow(2).mean().sqrt().item() < 0.05 * rms
        assert max_err(out, ref) < 0.25 * ref.abs().max().item()
        fp8.advance(chunk)
        full.advance(chunk)


def test_fp8_quantization_round_trip():
    x = torch.randn(3, 5, 2, 16, generator=torch.Generator().manual_seed(0)) * torch.rand(3, 5, 2, 1) * 10
    x8, scale = quantize_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    assert torch.equal(x8.float().abs().amax(-1), torch.full_like(scale, 448.0))  # each row uses the full range
    rel = (dequantize_fp8(x8, scale) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert rel.max() <= 2**-4 * 448 / 256 + 1e-6  # half an ulp at the top binade [256, 448], relative to the max


def test_ring_attention_rejects_bad_inputs(monkeypatch):
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 8, 2, 16)
    valid = torch.tensor(8)
    with pytest.raises(ValueError, match="does not match"):
        ring_attention(q, k, k[:, :, :1], valid)
    with pytest.raises(ValueError, match="differs"):
        ring_attention(q, k.half(), k.half(), valid)
    with pytest.raises(ValueError, match="fp8"):
        ring_attention(q, k.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), valid)
    with pytest.raises(ValueError, match="0-dim integer tensor"):
        ring_attention(q, k, k, torch.tensor([8]))
    with pytest.raises(ValueError, match="valid_rows must be in"):
        ring_attention_ref(q, k, k, 9)
    from sfpp.kernels import _device

    monkeypatch.setattr(_device, "arch", lambda device: 80)
    k8, ks = quantize_fp8(k)
    with pytest.raises(ValueError, match="sm_89 or newer"):  # Triton has no e4m3 on an A100
        ring_attention(q, k8, k8, valid, ks, ks)
