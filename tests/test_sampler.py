import pytest
import torch

from sfpp.engine.sampler import FlowMatchSchedule, add_noise, flow_to_x0


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
    ],
)
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchSchedule(**kwargs)
