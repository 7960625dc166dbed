"""Model level: the student's chunk output through the kernels (`model.use_kernels`) equals the torch path, over
ring wrap-arounds with sinks; and the ops are proper torch.library custom ops (schema, fake tensors, dispatch)."""

import copy
import json

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from conftest import TEST_CONFIG, randomize_  # noqa: E402

from sfpp.engine import ops  # noqa: E402
from sfpp.engine.cache import RingKVCache  # noqa: E402
from sfpp.models.dit import WanModel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_chunks(model, dtype, kv_dtype, chunks=3, frames=2, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    cache = RingKVCache(TEST_CONFIG, batch_size=2, frame_tokens=4, window=3, sink=1, dtype=dtype, kv_dtype=kv_dtype,
                        device=DEVICE)  # fmt: skip
    cache.set_text(
        model.text_kv(torch.randn(2, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, generator=g, device=DEVICE))
    )
    outs = []
    for _ in range(chunks):
        x = torch.randn(2, TEST_CONFIG.in_channels, frames, 4, 4, generator=g, device=DEVICE)
        t = torch.rand(2, frames, generator=g, device=DEVICE) * 1000
        model.forward_chunk(torch.randn_like(x), t.flip(1), cache)  # a denoising pass the next one overwrites
        outs.append(model.forward_chunk(x, t, cache))
        cache.advance(frames)
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize(
    "dtype,kv_dtype,tol",
    [
        (torch.float32, None, 1e-5),
        (torch.bfloat16, None, 0.02),  # bf16 end to end, two layers: measured 0.5%, a few bf16 steps
        # both paths attend over the same fp8 cache, the kernel with Q and P as two fp8 terms each: measured 0.46%
        # (1.4% with one term), the same as bf16 K/V
        (torch.bfloat16, torch.float8_e4m3fn, 0.02),
    ],
)
@torch.no_grad()
def test_chunk_output_with_kernels_equals_torch_path(dtype, kv_dtype, tol):
    model = randomize_(WanModel(TEST_CONFIG)).to(DEVICE, dtype).eval()
    ref, ref_cache = run_chunks(model, dtype, kv_dtype)
    fused, fused_cache = run_chunks(copy.deepcopy(model).use_kernels("triton"), dtype, kv_dtype)
    assert not fused.isnan().any()
    scale = ref.abs().max().item()
    assert (fused - ref).abs().max().item() <= tol * scale, (fused - ref).abs().max().item() / scale
    assert torch.equal(fused_cache.slot_frame, ref_cache.slot_frame)
    assert fused_cache.frames_done > fused_cache.sink + fused_cache.window  # over fill levels and a wrap


@torch.no_grad()
def test_torch_backend_of_the_ops_is_the_torch_path():
    """Through the ops' torch references the fused structure reproduces the plain model bit for bit in fp32."""
    model = randomize_(WanModel(TEST_CONFIG)).to(DEVICE).eval()
    ref, _ = run_chunks(model, torch.float32, None, chunks=3)
    fused, _ = run_chunks(copy.deepcopy(model).use_kernels("torch"), torch.float32, None, chunks=3)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)


def test_ops_are_torch_library_custom_ops():
    g = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(1, 8, 2, 16, generator=g, device=DEVICE)
    kv = torch.randn(1, 12, 2, 16, generator=g, device=DEVICE)
    valid = torch.tensor(8, device=DEVICE)
    x = torch.randn(1, 8, 32, generator=g, device=DEVICE)
    shift, scale = (torch.randn(1, 2, 1, 32, generator=g, device=DEVICE) for _ in "ab")
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.sfpp.ring_attention.default, (q, kv, kv.clone(), valid, 8, None, None, backend))
        torch.library.opcheck(torch.ops.sfpp.adaln_modulate.default, (x, shift, scale, 1e-6, torch.float32, backend))
    out = ops.ring_attention(q, kv, kv, valid, 8, backend="triton")
    torch.testing.assert_close(out, ops.ring_attention(q, kv, kv, valid, 8, backend="torch"), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(lambda a, b: ops.ring_attention(a, b, b, valid, 8, backend="torch"), fullgraph=True)
    torch.testing.assert_close(compiled(q, kv), out, atol=1e-5, rtol=1e-5)


def test_backend_resolution(monkeypatch, tmp_path):
    """auto: torch on a CPU (the interpreter is for tests); on a GPU the dispatch table's measured choice for the
    GPU model, else Triton (compile-checked). "cuda" means the CUDA C++ kernel where the op has one, else Triton."""
    cpu = torch.device("cpu")
    for op in ops.OPS:
        assert ops.resolve(op, "auto", cpu) == "torch"
    assert ops.resolve("ring_attention", "triton", cpu) == "triton"  # the interpreter is on in these tests
    with pytest.raises(ValueError, match="not available"):
        ops.resolve("cache_write", "cuda", cpu)
    with pytest.raises(ValueError, match="unknown op"):
        ops.resolve("noise_step", "auto", cpu)

    gpu = torch.device("cuda")  # resolution only: nothing runs on it
    monkeypatch.setattr(ops, "available", lambda op, device: ["torch", "triton", "cuda"][: 2 + (op == "cache_write")])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    table = tmp_path / "dispatch_table.json"
    monkeypatch.setattr(ops, "DISPATCH_TABLE", table)
    ops.load_dispatch_table.cache_clear()
    try:
        assert ops.resolve("cache_write", "auto", gpu) == "triton"  # no table yet: the compile-checked kernels
        assert ops.resolve("adaln_modulate", "cuda", gpu) == "triton"
        ops.write_dispatch_table("cache_write", "NVIDIA H100 80GB HBM3", {"triton": 0.2, "cuda": 0.1, "torch": 1.0},
                                 {"commit": "abc"}, path=table)  # fmt: skip
        ops.write_dispatch_table("ring_attention", "NVIDIA H200", {"triton": 2.0, "torch": 1.0}, {}, path=table)
        assert ops.resolve("cache_write", "auto", gpu) == "cuda"  # measured fastest on this GPU model
        assert ops.resolve("ring_attention", "auto", gpu) == "triton"  # the H200's entry is not this GPU's
        assert ops.load_dispatch_table(table)["NVIDIA H200"]["ring_attention"]["backend"] == "torch"
    finally:
        ops.load_dispatch_table.cache_clear()


def test_ring_attention_benchmark_records_its_choice(monkeypatch, tmp_path):
    """At the steady state (largest window), the faster of Triton's best tile and the torch backend, per K/V dtype."""
    from bench.bench_ring_attention import record_dispatch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    timings = [("triton-bf16-hopper", 21, 2.0), ("triton-bf16-small", 21, 3.0), ("torch", 21, 2.5),
               ("triton-fp8-hopper_fp8", 21, 3.0), ("torch-fp8", 21, 2.9), ("torch", 3, 0.01)]  # fmt: skip
    rows = [{"provider": p, "window": w, "ms": ms} for p, w, ms in timings]
    table = tmp_path / "dispatch_table.json"
    chosen = record_dispatch(rows, torch.device("cuda"), table)
    assert chosen == {"ring_attention": "triton", "ring_attention:fp8": "torch"}
    entry = json.loads(table.read_text())["NVIDIA H200"]["ring_attention"]
    assert entry["tile"] == "hopper" and entry["ms"] == {"triton": 2.0, "torch": 2.5} and entry["window"] == 21
    assert entry["commit"] and entry["command"].startswith("python -m bench.bench_ring_attention")


def test_ring_attention_roofline():
    """The benchmark's roofline at Wan 1.3B, 832x480, a full ring of 21 frames: FLOPs, bytes, time at H100 peak."""
    from bench.bench_ring_attention import roofline
    from sfpp.kernels.ring_attention import TILES

    lq, lk = 3 * 1560, 21 * 1560
    bf16, fp8 = (roofline(TILES[t], t == "hopper_fp8", 1, 12, lq, lk, 128) for t in ("hopper", "hopper_fp8"))
    assert bf16["flops"] == fp8["flops"] == 4 * 12 * lq * lk * 128
    assert bf16["mma_flops"] == 4 * 12 * 4736 * 32768 * 128  # 37 query tiles of 128, 256 key tiles of 128
    assert fp8["mma_flops"] == 2 * bf16["mma_flops"]  # two fp8 terms for Q and P; 512 key tiles of 64 = 32768 keys
    assert bf16["hbm_bytes"] == 12 * (4 * lq * 128 + lk * 512) and fp8["hbm_bytes"] == 12 * (4 * lq * 128 + lk * 264)
    assert bf16["bound"] == fp8["bound"] == "compute" and bf16["intensity"] > bf16["ridge"]
    assert bf16["us_at_peak"] == pytest.approx(bf16["mma_flops"] / 989e12 * 1e6)
