import math

import pytest
import torch

from sfpp.engine.sampler import FlowMatchSchedule, SelfForcingNoise, StreamNoise, add_noise, draw_noises, flow_to_x0


def test_warped_steps_match_self_forcing():
    s = FlowMatchSchedule()
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], rel=1e-6)
    assert s.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625], rel=1e-5)
    assert FlowMatchSchedule(shift=1.0).timesteps == pytest.approx([1000, 750, 500, 250])


def test_unwarped_steps_are_timesteps_with_the_table_s_sigmas():
    """CausVid's schedule: the model sees the steps as given; sigma is the shift-8 table's entry nearest each (Wan's
    scheduler: 1000 entries 8s / (1 + 7s) for s = 1, 0.999, ..., 0.001, as timesteps 1000 * sigma)."""
    s = FlowMatchSchedule(denoising_steps=(1000, 757, 522), shift=8.0, warp=False)
    assert s.timesteps == [1000.0, 757.0, 522.0]
    table = torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    table = 8 * table / (1 + 7 * table)
    nearest = [table[(1000 * table - t).abs().argmin()].item() for t in (1000, 757, 522)]
    assert s.sigmas == pytest.approx(nearest, rel=1e-12)
    assert s.sigmas[1:] == pytest.approx([0.757, 0.522], abs=5e-4) and s.sigmas[1] != 0.757
    assert FlowMatchSchedule(warp=False).timesteps == [1000.0, 750.0, 500.0, 250.0]


def test_flow_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    sigma = 0.8333
    x_t = add_noise(x0, noise, sigma)
    torch.testing.assert_close(flow_to_x0(x_t, noise - x0, sigma), x0)  # v = noise - x0 recovers x0 exactly


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"denoising_steps": ()}, "denoising_steps"),
        ({"denoising_steps": (1000, 1000)}, "decreasing"),
        ({"denoising_steps": (1200, 500)}, "denoising_steps"),
        ({"shift": 0}, "shift"),
        ({"context_noise": -1}, "context_noise"),
        ({"frame_correlation": 1.0}, "frame_correlation"),
        ({"frame_correlation": -0.1}, "frame_correlation"),
        ({"frame_correlation": 0.5, "correlated_from": 4}, "correlated_from"),
    ],
)
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchSchedule(**kwargs)


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_stream_noise_shares_one_draw_across_frames_and_chunks():
    """From `correlated_from` on, every frame's noise is sqrt(rho) x the stream's one draw + sqrt(1 - rho) x its own:
    unit variance, correlation rho between frames of a chunk and across chunks; the earlier steps and independent
    schedules draw exactly what `draw_noises` draws."""
    cpu, shape = torch.device("cpu"), (2, 16, 3, 16, 16)
    plain = FlowMatchSchedule()
    ours, theirs = StreamNoise(torch.Generator().manual_seed(0), cpu), torch.Generator().manual_seed(0)
    for _ in range(3):
        assert torch.equal(ours.chunk(plain, shape), draw_noises(plain, shape, theirs, cpu))
    assert ours.shared is None

    rho, start = 0.9, 2
    schedule = FlowMatchSchedule(frame_correlation=rho, correlated_from=start)
    noise = StreamNoise(torch.Generator().manual_seed(1), cpu)
    first, second = noise.chunk(schedule, shape), noise.chunk(schedule, shape)  # [4, B, C, Fc, h, w] each
    shared = noise.shared
    assert shared.shape == (2, 16, 1, 16, 16) and noise.chunk(schedule, shape) is not None and noise.shared is shared
    for step in range(4):
        for frame in (first[step, :, :, 0], first[step, :, :, 2], second[step, :, :, 1]):
            assert 0.95 < float(frame.std()) < 1.05
        within, across = (
            _corr(first[step, :, :, 0], first[step, :, :, 1]),
            _corr(first[step, :, :, 2], second[step, :, :, 0]),
        )
        if step < start:
            assert abs(within) < 0.05 and abs(across) < 0.05
        else:
            assert within == pytest.approx(rho, abs=0.02) and across == pytest.approx(rho, abs=0.02)
            own = (first[step] - math.sqrt(rho) * shared) / math.sqrt(1 - rho)  # what each frame drew for itself
            assert abs(_corr(own[:, :, 0], own[:, :, 1])) < 0.05
    with pytest.raises(ValueError, match="StreamNoise"):
        draw_noises(schedule, shape, None, cpu)
    with pytest.raises(ValueError, match="frame_correlation 0"):
        SelfForcingNoise(None, (2, 16, 6, 16, 16), cpu).chunk(schedule, shape)
