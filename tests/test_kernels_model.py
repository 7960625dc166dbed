"""Model level: the student's chunk output through the kernels (`model.use_kernels`) equals the torch path, over
ring wrap-arounds with sinks; and the ops are proper torch.library custom ops (schema, fake tensors, dispatch)."""

import copy

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from conftest import TEST_CONFIG, randomize_  # noqa: E402

from sfpp import ops  # noqa: E402
from sfpp.cache import RingKVCache  # noqa: E402
from sfpp.model import WanModel  # noqa: E402

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
        (torch.bfloat16, torch.float8_e4m3fn, 0.03),  # both paths attend over the same fp8 cache: measured 0.6%
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


@torch.no_grad()
def test_torch_backend_of_the_ops_is_the_torch_path():
    """Through the ops' torch references the fused structure reproduces the plain model bit for bit in fp32."""
    model = randomize_(WanModel(TEST_CONFIG)).to(DEVICE).eval()
    ref, _ = run_chunks(model, torch.float32, None, chunks=3)
    fused, _ = run_chunks(copy.deepcopy(model).use_kernels("torch"), torch.float32, None, chunks=3)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)


def test_ops_are_torch_library_custom_ops():
    g = torch.Generator(DEVICE).manual_seed(0)
    x, flow = torch.randn(1, 4, 2, 2, 4, generator=g, device=DEVICE), torch.randn(1, 4, 2, 2, 4, device=DEVICE)
    q = torch.randn(1, 8, 2, 16, generator=g, device=DEVICE)
    kv = torch.randn(1, 12, 2, 16, generator=g, device=DEVICE)
    slots = torch.tensor([0, 1, -1], device=DEVICE)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.sfpp.noise_step.default, (x, flow, 0.5, 0.3, None, None, 3, 8, backend))
        torch.library.opcheck(
            torch.ops.sfpp.ring_attention.default, (q, kv, kv.clone(), slots, 4, None, None, backend, False)
        )
    x0, x_next = ops.noise_step(x, flow, 0.5, 0.3, 3, 8, backend="triton")
    torch.testing.assert_close(x_next, ops.noise_step(x, flow, 0.5, 0.3, 3, 8, backend="torch")[1], atol=1e-5, rtol=0)
    compiled = torch.compile(lambda a, b: ops.noise_step(a, b, 0.5, 0.3, 3, 8, backend="torch")[1], fullgraph=True)
    torch.testing.assert_close(compiled(x, flow), x_next, atol=1e-5, rtol=0)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.resolve("noise_step", "auto", cpu) == "torch"  # the interpreter is for tests, never auto
    monkeypatch.setenv("SFPP_BACKEND_NOISE_STEP", "triton")
    assert ops.resolve("noise_step", "auto", cpu) == "triton"
    with pytest.raises(ValueError, match="not available"):
        ops.resolve("cache_write", "cuda", cpu)
