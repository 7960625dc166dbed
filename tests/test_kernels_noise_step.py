"""Fused sampler step with in-kernel noise: the generator is Philox4x32-10 (known-answer vector), the Triton kernel
reproduces the torch reference from (seed, offset), the noise has torch.randn's statistics, and the step equals the
sampler's `flow_to_x0` + `add_noise` given that noise. CPU via Triton's interpreter."""

import math

import pytest
import torch
from conftest import require_triton  # noqa: E402

require_triton()

from kernels.noise_step import noise_step, noise_step_ref, philox4x32_ref, philox_normal_ref  # noqa: E402
from sfpp.sampler import add_noise, flow_to_x0  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_philox_known_answer():
    """Random123's known-answer vector for philox4x32-10 with a zero counter and key."""
    words = philox4x32_ref(torch.zeros(1, dtype=torch.long), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 16, 3, 6, 10), (1, 3, 1, 5, 7)])  # the second: odd, not a multiple of 4
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 7, 12), (3, 4 * 2**32 + 8)])  # 64-bit seeds, counters
def test_noise_step_matches_reference(dtype, shape, seed, offset):
    g = torch.Generator(DEVICE).manual_seed(seed % 1000)
    x = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    flow = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    out = torch.full(shape, float("nan"), device=DEVICE)
    x0, x_next = noise_step(x, flow, 0.8, 0.55, seed, offset, out=out)
    ref_x0, ref_next = noise_step_ref(x, flow, 0.8, 0.55, seed, offset)
    assert x_next is out
    torch.testing.assert_close(x0, ref_x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_next, ref_next, rtol=1e-5, atol=1e-5)  # log/cos/sin differ in the last bits
    noise = philox_normal_ref(x.numel(), seed, offset, DEVICE).view(shape)
    expect = add_noise(flow_to_x0(x.float(), flow.float(), 0.8), noise, 0.55)  # the sampler's own formulas
    torch.testing.assert_close(x_next, expect, rtol=1e-5, atol=1e-5)


def test_backward_noise_initialization_per_frame_sigmas():
    """Training's form: clean latents re-noised to a per-frame level (flow=None), written in place, no x0."""
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(2, 4, 5, 3, 6, generator=g, device=DEVICE)
    sigma = torch.rand(2, 5, generator=g, device=DEVICE)
    sigma[0, 0], sigma[1, 4] = 0.0, 1.0  # clean and pure noise
    _, ref = noise_step_ref(x, None, 0.0, sigma, 11, 0)
    x_in = x.clone()
    x0, out = noise_step(x_in, None, 0.0, sigma, 11, 0, out=x_in, store_x0=False)
    assert x0 is None and out is x_in
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, :, 0], x[0, :, 0])
    torch.testing.assert_close(out[1, :, 4], philox_normal_ref(x.numel(), 11, 0, DEVICE).view(x.shape)[1, :, 4])


def test_noise_is_reproducible_and_offsets_continue_the_stream():
    x = torch.zeros(1, 1, 1, 1, 4096, device=DEVICE)
    _, a = noise_step(x, None, 0.0, 1.0, 5, 0)
    _, b = noise_step(x, None, 0.0, 1.0, 5, 0)
    _, c = noise_step(x, None, 0.0, 1.0, 5, 2048)
    _, d = noise_step(x, None, 0.0, 1.0, 6, 0)
    assert torch.equal(a, b)
    assert torch.equal(a.flatten()[2048:], c.flatten()[:2048])
    assert (a != d).float().mean() > 0.99
    with pytest.raises(ValueError, match="multiple of 4"):
        noise_step(x, None, 0.0, 1.0, 5, 2)


def test_noise_has_the_statistics_of_randn():
    """Mean, variance, tails and the CDF (Kolmogorov-Smirnov at 1e-3) of 2^18 draws from the kernel, against the
    standard normal; and no correlation between neighbours (the four lanes of one counter, and across counters)."""
    n = 2**18
    _, z = noise_step(torch.zeros(n, device=DEVICE), None, 0.0, 1.0, 1234, 0)
    z = z.double().cpu()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z.abs() > 3).double().mean() - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    cdf = 0.5 * (1 + torch.erf(z.sort().values / math.sqrt(2)))
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.95 * se  # 1.95/sqrt(n): the 0.1% critical value
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(torch.cat([lanes[:-1].T, lanes[1:].T], 0))  # 4 lanes, and the next counter's 4
    off_diag = corr - torch.eye(8, dtype=corr.dtype)
    assert off_diag.abs().max() < 6 * 2 / math.sqrt(n)
