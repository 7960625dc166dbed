import pytest
import torch

from sfpp.engine.sampler import FlowMatchSchedule, add_noise, flow_to_x0


def test_warped_steps_match_self_forcing():
    s = FlowMatchSchedule()
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], rel=1e-6)
    assert s.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625], rel=1e-5)
    assert FlowMatchSchedule(shift=1.0).timesteps == pytest.approx([1000, 750, 500, 250])


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
