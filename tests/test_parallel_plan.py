"""bench/parallel_plan.py's Ulysses bytes are what `sfpp.engine.parallel` sends: counted on one process through a
ContextParallel whose collectives only record their sizes."""

import dataclasses

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from bench.parallel_plan import DEGREES, Shape, doc, plan_rows, ring_bytes_per_forward, ulysses_bytes_per_forward
from sfpp.engine.cache import RingKVCache
from sfpp.engine.parallel import ContextParallel
from sfpp.models.dit import CONFIGS, WanModel


class Counting(ContextParallel):
    """Rank 0 of `size` with collectives that count what this rank would send and return shapes, not data."""

    def __init__(self, size: int) -> None:  # no process group: nothing is sent
        self.size, self.rank, self.scheme, self.sent = size, 0, "ulysses", 0

    def all_to_all(self, x):  # [N, ...]: slice j goes to rank j, this rank's own slice stays
        self.sent += x.numel() * x.element_size() * (self.size - 1) // self.size
        return x.contiguous()

    def all_gather(self, x):  # x to every other rank
        self.sent += x.numel() * x.element_size() * (self.size - 1)
        return x.expand(self.size, *x.shape).contiguous()


@pytest.mark.parametrize("n", [2, 4])
def test_ulysses_bytes_are_what_the_model_sends(n):
    cfg = dataclasses.replace(TEST_CONFIG, num_heads=4)
    model = randomize_(WanModel(cfg)).eval()
    cp = Counting(n)
    model.set_parallel(cp)
    h, w, frames = 4, 8, 2  # 2x4 = 8 tokens per frame
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=8, window=4, heads=model.cache_heads)
    with torch.no_grad():
        cache.set_text(model.text_kv(torch.zeros(1, cfg.text_len, cfg.text_dim)))
        flow = model.forward_chunk(torch.randn(1, 16, frames, h, w), torch.full((1,), 500.0), cache)
    assert flow.shape == (1, 16, frames, h, w)
    shape = Shape(frame_tokens=8, frames=frames, bytes_per_value=4)  # fp32 here
    assert cp.sent == ulysses_bytes_per_forward(cfg, shape, n)


def test_the_plan_covers_both_models_degrees_and_links():
    rows = plan_rows()
    assert len(rows) == 2 * len(DEGREES) * 2 * 2
    cfg, shape = CONFIGS["wan2.1-1.3b"], Shape()
    # 1.3B, N=2, per forward: 30 layers x 4 tensors x 2340 tokens x 1536 x 2 bytes x 1/2, + the gathered output
    assert ulysses_bytes_per_forward(cfg, shape, 2) == 30 * 4 * 2340 * 1536 * 2 / 2 + 2340 * 2 * 64
    assert ring_bytes_per_forward(cfg, shape, 2) == 30 * 32760 / 2 * 1536 * 2 * 2
    eight = [r for r in rows if r["model"] == "wan2.1-1.3b" and r["n"] == 8 and r["scheme"] == "ulysses"]
    assert eight and all(r["chunk_ms"] is None for r in eight)  # 8 does not divide 12 heads
    assert all(r["chunk_ms"] is not None for r in rows if r["model"] == "wan2.1-14b")  # 2, 4, 8 divide 40
    text = doc()
    assert "| wan2.1-14b | 8 | ulysses |" in text and "PCIe" in text
