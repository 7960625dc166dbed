"""GPU-only checks (skipped without CUDA): the chunk step runs without host syncs and replays from a CUDA graph."""

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.engine.cache import RingKVCache
from sfpp.models.dit import WanModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def setup(dtype=torch.float32, window=5, sink=1):
    torch.manual_seed(0)
    model = randomize_(WanModel(TEST_CONFIG)).to("cuda", dtype).eval()
    context = torch.randn(2, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, device="cuda")
    caches = []
    for _ in range(2):
        cache = RingKVCache(
            TEST_CONFIG, batch_size=2, frame_tokens=6, window=window, sink=sink, dtype=dtype, device="cuda"
        )
        cache.set_text(model.text_kv(context))
        caches.append(cache)
    return model, caches


@torch.no_grad()
def test_gpu_matches_cpu():
    model, (cache, _) = setup()
    cpu_model = randomize_(WanModel(TEST_CONFIG)).eval()
    cpu_cache = RingKVCache(TEST_CONFIG, batch_size=2, frame_tokens=6, window=5, sink=1)
    cpu_cache.set_text(
        cpu_model.text_kv(
            torch.randn(2, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, generator=torch.Generator().manual_seed(9))
        )
    )
    cache.set_text([(k.cuda(), v.cuda()) for k, v in cpu_cache.text_kv])
    for _ in range(6):
        x = torch.randn(2, 16, 2, 4, 6)
        t = torch.rand(2, 2) * 1000
        out_cpu = cpu_model.forward_chunk(x, t, cpu_cache)
        out_gpu = model.forward_chunk(x.cuda(), t.cuda(), cache)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)  # TF32 may be on
        cpu_cache.advance(2)
        cache.advance(2)


def _warm_up_and_capture(model, x, t, cache):
    """Run one chunk pass eagerly on a side stream with host syncs forbidden, then capture it (not run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            out = model.forward_chunk(x, t, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model.forward_chunk(x, t, cache)
    return out, graph, static_out


@pytest.mark.parametrize("kernels", [None, "triton"])
@torch.no_grad()
def test_chunk_step_has_no_host_sync_and_graph_replay_equals_eager(kernels):
    """The torch path slices the ring's valid prefix by a host int: one graph per fill level. The Triton kernel
    reads the prefix on the device: the graph captured at the first fill level serves every later one."""
    if kernels == "triton":
        pytest.importorskip("triton")
    model, (graph_cache, eager_cache) = setup()
    model.use_kernels(kernels)
    window, sink = graph_cache.window, graph_cache.sink
    static_t = torch.full((2, 2), 937.5, device="cuda")
    graphs = {}
    for _ in range(12):  # the fill levels, then several wraps of the 5-frame ring
        x = torch.randn(2, 16, 2, 4, 6, device="cuda")
        level = min(graph_cache.frames_done + 2, sink + window) if kernels is None else 0
        if level not in graphs:
            static_x = x.clone()
            out, graph, static_out = _warm_up_and_capture(model, static_x, static_t, graph_cache)
            graphs[level] = (static_x, graph, static_out)
        else:
            static_x, graph, static_out = graphs[level]
            static_x.copy_(x)
            graph.replay()
            out = static_out
        eager = model.forward_chunk(x, static_t, eager_cache)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        graph_cache.advance(2)
        eager_cache.advance(2)
    assert len(graphs) == (3 if kernels is None else 1)  # fill levels 2, 4, 6 slots of 6
    torch.testing.assert_close(graph_cache.k, eager_cache.k)
    assert torch.equal(graph_cache.slot_frame, eager_cache.slot_frame)
