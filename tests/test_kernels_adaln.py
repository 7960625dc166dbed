"""Fused adaLN modulate (LayerNorm + per-frame shift/scale + cast): the Triton kernel against an exact (fp64)
reference, bounded by the error of the torch path in the same output dtype, as flash-attention's tests do; the
torch reference is the model's own math bit for bit; the op is a torch.library custom op; and the student's chunk
runs it (blocks and head) under `use_kernels`. CPU via Triton's interpreter."""

import copy

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from conftest import TEST_CONFIG, randomize_  # noqa: E402

import sfpp.kernels.adaln as adaln_module  # noqa: E402
from sfpp.engine import ops  # noqa: E402
from sfpp.engine.cache import RingKVCache  # noqa: E402
from sfpp.kernels.adaln import adaln_modulate  # noqa: E402
from sfpp.kernels.reference import adaln_modulate_ref  # noqa: E402
from sfpp.models.dit import WanBlock, WanModel, _modulate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # relative spacing at 1


def inputs(batch, frames, length, dim, seed, shift_batch=None):
    """x [B, F*L, D] with per-row scales and offsets (some rows offset by hundreds, far above their spread) and
    shift/scale [B, F, 1, D] as the model makes them: chunks (strided views) of modulation + per-frame e."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    rows = (batch, frames * length, 1)
    offset = torch.randn(rows, generator=g, device=DEVICE) * 3
    offset = torch.where(torch.rand(rows, generator=g, device=DEVICE) < 0.3, offset * 100 + 500, offset)
    spread = torch.rand(rows, generator=g, device=DEVICE) * 4 + 0.05
    x = torch.randn(batch, frames * length, dim, generator=g, device=DEVICE) * spread + offset
    modulation = torch.randn(1, 6, dim, generator=g, device=DEVICE) / dim**0.5
    e = torch.randn(shift_batch or batch, frames, 6, dim, generator=g, device=DEVICE)
    shift, scale = (modulation.unsqueeze(1) + e).chunk(6, dim=2)[:2]
    return x, shift, scale


def exact(x, shift, scale):
    """The op's value in fp64, from the same fp32 inputs: what every rounding is measured against."""
    x = x.double()
    n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
    return (n.unflatten(1, (shift.shape[1], -1)) * (1 + scale.double()) + shift.double()).flatten(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,frames,length,dim,shift_batch",
    [(2, 1, 9, 48, None), (1, 2, 13, 72, None), (2, 3, 7, 100, None), (3, 4, 5, 100, 1), (1, 3, 11, 160, None)],
)  # odd token counts and dims, F = 1..4, shift/scale broadcast over the batch, a dim over one 128 tile
def test_kernel_matches_reference(dtype, batch, frames, length, dim, shift_batch):
    x, shift, scale = inputs(batch, frames, length, dim, seed=dim + frames, shift_batch=shift_batch)
    # a strided output inside a NaN buffer: every element of `out` must be written, nothing around it
    buf = torch.full((batch, frames * length + 2, dim + 3), float("nan"), dtype=dtype, device=DEVICE)
    out = buf[:, 1:-1, :dim]
    got = adaln_modulate(x, shift, scale, EPS, dtype, out=out)
    assert got is out and got.dtype == dtype
    assert not got.isnan().any()
    assert buf[:, 0].isnan().all() and buf[:, -1].isnan().all() and buf[..., dim:].isnan().all()

    want = exact(x, shift, scale)
    torch_err = (adaln_modulate_ref(x, shift, scale, EPS, dtype).double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    atol = 4 * ULP[dtype] * want.abs().max().item() if dtype == torch.float32 else 1e-5
    assert err <= 2 * torch_err + atol, (err, torch_err)
    if dtype == torch.float32:  # and a few ulps on its own: torch's layer_norm loses ~1e-4 on the offset rows
        assert err <= 32 * ULP[dtype] * want.abs().max().item(), err
    if dtype != torch.float32:  # rounded to nearest (not truncated, as the interpreter's own cast would)
        wrong = (got != want.to(dtype)).float().mean().item()
        assert wrong < 0.05, wrong


def test_kernel_strided_input_and_x_dtype():
    """The model's first block gets x as a transposed view (patch embedding); x may be low precision too."""
    x, shift, scale = inputs(2, 2, 9, 48, seed=1)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, D not contiguous
    assert xt.stride(-1) != 1
    want = adaln_modulate(x, shift, scale, EPS, torch.float32)
    assert torch.equal(adaln_modulate(xt, shift, scale, EPS, torch.float32), want)
    xb = x.bfloat16()
    got = adaln_modulate(xb, shift, scale, EPS, torch.bfloat16)
    want = adaln_modulate_ref(xb, shift, scale, EPS, torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * 4)


def test_kernel_rejects_bad_shapes():
    x, shift, scale = inputs(1, 2, 4, 48, seed=2)
    with pytest.raises(ValueError, match="frames of equal length"):
        adaln_modulate(x[:, :7], shift, scale, EPS, torch.bfloat16)
    with pytest.raises(ValueError, match="not \\[B, F, 1, 48\\]"):
        adaln_modulate(x, shift[..., :47], scale, EPS, torch.bfloat16)
    with pytest.raises(ValueError, match="out"):
        adaln_modulate(x, shift, scale, EPS, torch.bfloat16, out=torch.empty_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_math_bit_for_bit(dtype):
    """`adaln_modulate_ref` (the op's torch backend) is what WanBlock computes without kernels, exactly."""
    block = WanBlock(TEST_CONFIG)
    x, shift, scale = inputs(2, 3, 5, TEST_CONFIG.dim, seed=3)
    want = _modulate(block.norm1(x), shift, scale).to(dtype)
    assert torch.equal(ops.adaln_modulate(x, shift, scale, block.norm1.eps, dtype, backend="torch"), want)


def test_custom_op():
    x, shift, scale = inputs(1, 2, 3, 48, seed=4)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.sfpp.adaln_modulate.default, (x, shift, scale, EPS, torch.bfloat16, backend))
    assert ops.resolve("adaln_modulate", "auto", torch.device("cpu")) == "torch"
    assert "cuda" not in ops.available("adaln_modulate", torch.device(DEVICE))  # no CUDA C++ version
    fn = lambda a: ops.adaln_modulate(a, shift, scale, EPS, torch.float16, backend="torch")
    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(x), adaln_modulate_ref(x, shift, scale, EPS, torch.float16))


def _chunks(model, dtype, chunks=2, frames=2):
    g = torch.Generator(DEVICE).manual_seed(0)
    cache = RingKVCache(TEST_CONFIG, batch_size=2, frame_tokens=4, window=3, sink=1, dtype=dtype, device=DEVICE)
    cache.set_text(
        model.text_kv(torch.randn(2, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, generator=g, device=DEVICE))
    )
    outs = []
    for _ in range(chunks):
        x = torch.randn(2, TEST_CONFIG.in_channels, frames, 4, 4, generator=g, device=DEVICE)
        t = torch.rand(2, frames, generator=g, device=DEVICE) * 1000
        outs.append(model.forward_chunk(x, t, cache))
        cache.advance(frames)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])  # test_kernels_model's
def test_model_chunk_runs_the_kernel(monkeypatch, dtype, tol):
    """Under use_kernels("triton") every block (twice) and the head call the kernel, and the chunk output still
    matches the torch path; with autograd on the torch path runs and the kernel is never called."""
    calls = []
    launcher = adaln_module.adaln_modulate
    monkeypatch.setattr(adaln_module, "adaln_modulate", lambda *a, **k: calls.append(a[4]) or launcher(*a, **k))
    model = randomize_(WanModel(TEST_CONFIG)).to(DEVICE, dtype).eval()
    with torch.no_grad():
        ref = _chunks(model, dtype)
        assert not calls
        fused = _chunks(copy.deepcopy(model).use_kernels("triton"), dtype)
    assert calls == [dtype] * (2 * TEST_CONFIG.num_layers + 1) * 2  # two chunks
    assert not fused.isnan().any()
    scale = ref.abs().max().item()
    assert (fused - ref).abs().max().item() <= tol * scale, (fused - ref).abs().max().item() / scale

    calls.clear()
    with torch.enable_grad():
        grad = _chunks(copy.deepcopy(model).use_kernels("triton"), dtype, chunks=1)
    assert not calls and grad.requires_grad
    # the torch path (with gradients its self-attention is the two-part cache + chunk attention: not bit for bit)
    assert (grad.detach() - ref[:, :, :2]).abs().max().item() <= tol * scale
