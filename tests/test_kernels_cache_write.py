"""Fused cache write (q/k RMSNorm + 3D RoPE + ring append, optionally fp8) against its torch reference and against
the model's own torch path, over ring wrap-arounds, sinks on and off, every dtype. CPU via Triton's interpreter."""

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from conftest import TEST_CONFIG, randomize_  # noqa: E402

from sfpp.engine.cache import RingKVCache  # noqa: E402
from sfpp.engine.rope import apply_rope, rope_table  # noqa: E402
from sfpp.kernels.cache_write import cache_write  # noqa: E402
from sfpp.kernels.reference import cache_write_ref  # noqa: E402
from sfpp.models.dit import WanConfig, WanModel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def assert_nearly_equal(out, ref, dtype):
    """Equal but for last-bit effects: the kernel's 1/sqrt and FMAs may differ from torch's in the last fp32 bit,
    which can move a rare rounding to bf16/fp16/fp8 by one step. Poison (NaN) must stay where it was."""
    fp8 = out.dtype == torch.float8_e4m3fn
    out, ref = out.float(), ref.float()
    assert torch.equal(out.isnan(), ref.isnan())
    out, ref = out.nan_to_num(), ref.nan_to_num()
    if fp8 or dtype != torch.float32:
        assert (out != ref).float().mean() <= 0.01
    step = 2**-3 if fp8 else 2 * ULP[dtype]  # one step of the stored format, relative
    torch.testing.assert_close(out, ref, rtol=step, atol=2**-9 if fp8 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads,head_dim,sink", [(3, 16, 0), (2, 24, 2)])
def test_cache_write_matches_reference_over_wraps(dtype, fp8, heads, head_dim, sink):
    cfg = WanConfig(dim=heads * head_dim, num_heads=heads, num_layers=1)
    batch, height, width, window, chunk = 2, 2, 2, 3, 2
    tokens = height * width
    cos_t, sin_t = (t.to(DEVICE) for t in rope_table(cfg))
    g = torch.Generator(DEVICE).manual_seed(heads + sink)
    norm_q = (1 + 0.3 * torch.randn(cfg.dim, generator=g, device=DEVICE)).to(dtype)
    norm_k = (1 + 0.3 * torch.randn(cfg.dim, generator=g, device=DEVICE)).to(dtype)
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype
    caches = [
        RingKVCache(
            cfg,
            batch_size=batch,
            frame_tokens=tokens,
            window=window,
            sink=sink,
            dtype=dtype,
            kv_dtype=kv_dtype,
            device=DEVICE,
        )  # fmt: skip
        for _ in range(2)
    ]
    for c in caches:  # poison: rows the chunk does not own must come out untouched
        for buf in (c.k, c.v) + ((c.k_scale, c.v_scale) if fp8 else ()):
            buf.view(torch.uint8).fill_(0x7F)  # NaN in fp8, fp32 and bf16/fp16 alike
    for _ in range(4):  # 8 frames through 3 window slots: two wraps
        n = chunk
        length = n * tokens
        q, k, v = (3 * torch.randn(batch, length, cfg.dim, generator=g, device=DEVICE).to(dtype) for _ in "qkv")
        outs = []
        for fn, c in zip((cache_write, cache_write_ref), caches, strict=True):
            plan = c.plan(batch, n, tokens)
            args = (q, k, v, norm_q, norm_k, cos_t, sin_t, plan.frame_pos, plan.token_index, *c.layer(0))
            outs.append(fn(*args, height, width, cfg.rope_split, cfg.eps))
            c.advance(n)
        assert outs[0].shape == (batch, length, heads, head_dim)
        assert_nearly_equal(outs[0], outs[1], dtype)
        for a, b in zip(caches[0].layer(0), caches[1].layer(0), strict=True):
            if a is not None:
                assert_nearly_equal(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cache_write_equals_the_model_torch_path(dtype):
    """The fused op computes exactly what WanBlock + RingKVCache.write do: query/key norm, RoPE from
    `WanModel.rope` at the chunk's absolute frame positions, and the ring rows from `plan`."""
    cfg = TEST_CONFIG
    model = randomize_(WanModel(cfg)).to(DEVICE, dtype).eval()
    attn = model.blocks[0].self_attn
    batch, frames, height, width = 2, 2, 2, 3
    cache = RingKVCache(
        cfg, batch_size=batch, frame_tokens=height * width, window=3, sink=1, dtype=dtype, device=DEVICE
    )
    fused = RingKVCache(
        cfg, batch_size=batch, frame_tokens=height * width, window=3, sink=1, dtype=dtype, device=DEVICE
    )
    for _ in range(4):
        x = torch.randn(batch, frames * height * width, cfg.dim, device=DEVICE, dtype=dtype)
        plan = cache.plan(batch, frames, height * width)
        fplan = fused.plan(batch, frames, height * width)
        rope = model.rope(plan.frame_pos, height, width)
        q = apply_rope(attn.query(x), *rope)
        k, v = attn.key_value(x)
        cache.write(0, plan, apply_rope(k, *rope), v)
        tables = model._rope  # built by model.rope on this device
        q_fused = cache_write(
            attn.q(x), attn.k(x), attn.v(x), attn.norm_q.weight, attn.norm_k.weight, *tables,
            fplan.frame_pos, fplan.token_index, *fused.layer(0), height, width, cfg.rope_split, cfg.eps,
        )  # fmt: skip
        assert_nearly_equal(q_fused, q, dtype)
        assert_nearly_equal(fused.k, cache.k, dtype)
        assert torch.equal(fused.v, cache.v)
        cache.advance(frames)
        fused.advance(frames)
