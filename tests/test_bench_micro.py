"""CPU micro-benchmarks (pytest-benchmark): one chunk step of sfpp and of the Self-Forcing baseline, and one
streaming VAE decode, at a tiny size. Run alone with `pytest tests/test_bench_micro.py --benchmark-only`."""

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.benchmark.baseline import SelfForcingBaseline
from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.dit import WanModel
from sfpp.models.vae import WanVAE, WanVAEConfig

pytest.importorskip("pytest_benchmark")
SHAPE = (1, 16, 2, 4, 6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(WanModel(TEST_CONFIG), scale=0.1).eval()


def context():
    return torch.randn(1, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, generator=torch.Generator().manual_seed(0))


def test_sfpp_chunk_step(benchmark, model):
    cache = RingKVCache(TEST_CONFIG, batch_size=1, frame_tokens=6, window=4)
    cache.set_text(model.text_kv(context()))
    runner = ChunkRunner(model, cache, FlowMatchSchedule())
    noises = runner.draw_noise(SHAPE, torch.Generator().manual_seed(0))
    benchmark.pedantic(runner, args=(noises,), rounds=5, warmup_rounds=3)  # warm-up fills the ring


def test_baseline_chunk_step(benchmark, model):
    base = SelfForcingBaseline(model, FlowMatchSchedule(), batch_size=1, frame_tokens=6, window=4)
    base.set_text(context())
    noises = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    benchmark.pedantic(base, args=(noises,), rounds=5, warmup_rounds=3)


def test_vae_stream_decode(benchmark):
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(base_dim=8)).eval()
    stream = vae.stream()
    z = torch.randn(1, 16, 2, 4, 4)
    benchmark.pedantic(stream.decode, args=(z,), rounds=3, warmup_rounds=1)
