"""The ring-buffer KV cache: chunk-by-chunk inference equals the full-sequence block-causal forward, attention over
the ring equals an explicit keep-the-last-window reference after many wraps, and the cache never grows."""

import math

import pytest
import torch

from sfpp.engine.attention import block_causal_mask
from sfpp.engine.cache import RingKVCache
from sfpp.kernels.reference import ring_attention_ref


def make_inputs(cfg, batch, frames, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, h, w, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize(
    "frames_per_chunk,window,sink,num_frames",
    [
        (3, 21, 0, 9),  # the ring never fills
        (2, 5, 0, 11),  # wraps mid-chunk, ragged last chunk of 1 frame
        (2, 5, 1, 11),  # with a sink frame
        (3, 4, 2, 13),  # window barely larger than a chunk, two sinks
        (1, 3, 0, 8),  # frame by frame
    ],
)
@torch.no_grad()
def test_chunked_equals_full_block_causal(model, cfg, frames_per_chunk, window, sink, num_frames):
    batch = 2
    x, t, context = make_inputs(cfg, batch, num_frames)
    full = model(x, t, context, frames_per_chunk=frames_per_chunk, window=window, sink=sink)

    cache = RingKVCache(cfg, batch_size=batch, frame_tokens=4, window=window, sink=sink)
    cache.set_text(model.text_kv(context))
    outs = []
    for start in range(0, num_frames, frames_per_chunk):
        xs, ts = x[:, :, start : start + frames_per_chunk], t[:, start : start + frames_per_chunk]
        # Denoising re-runs the chunk: earlier passes write other K/V into the same slots; the last one decides.
        model.forward_chunk(torch.randn_like(xs), ts.flip(1), cache)
        outs.append(model.forward_chunk(xs, ts, cache))
        cache.advance(xs.shape[2])
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_block_causal_differs_from_bidirectional(model, cfg):
    """Guard against a mask that does nothing: later frames must not influence earlier chunks causally."""
    x, t, context = make_inputs(cfg, 1, 6)
    causal = model(x, t, context, frames_per_chunk=3)
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])
    causal2 = model(x2, t, context, frames_per_chunk=3)
    torch.testing.assert_close(causal[:, :, :3], causal2[:, :, :3])  # first chunk unaffected by the second
    assert not torch.allclose(causal[:, :, 3:], causal2[:, :, 3:])
    assert not torch.allclose(model(x, t, context)[:, :, :3], causal[:, :, :3])  # bidirectional sees the future


def explicit_attention(q, keys, values):
    """float64 softmax attention over an explicit list of key/value frames [B, T, H, D]."""
    k = torch.cat(keys, 1).double()
    v = torch.cat(values, 1).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window,sink,chunk", [(5, 0, 2), (5, 2, 2), (7, 1, 3), (3, 0, 3), (4, 3, 1)])
def test_ring_attention_after_many_wraps(cfg, window, sink, chunk):
    batch, tokens, heads, dim = 2, 3, cfg.num_heads, cfg.head_dim
    cache = RingKVCache(cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink)
    k_cache, v_cache = cache.k[0], cache.v[0]
    k_cache.normal_()  # stale garbage in empty slots must never be read
    v_cache.normal_()
    g = torch.Generator().manual_seed(window * 100 + sink * 10 + chunk)
    all_k, all_v = [], []
    total = 12 * window + 1  # many wraps, ragged end
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        k = torch.randn(batch, n * tokens, heads, dim, generator=g)
        v = torch.randn(batch, n * tokens, heads, dim, generator=g)
        q = torch.randn(batch, n * tokens, heads, dim, generator=g)
        all_k += list(k.split(tokens, 1))
        all_v += list(v.split(tokens, 1))
        plan = cache.plan(batch, n, tokens)
        cache.write(0, plan, k, v)
        out = ring_attention_ref(q, k_cache, v_cache, plan.valid_rows_host)
        end = start + n
        keep = [f for f in range(end) if f < sink or f >= max(sink, end - window)]
        ref = explicit_attention(q, [all_k[f] for f in keep], [all_v[f] for f in keep])
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        held = sorted(f for f in cache.slot_frame.tolist() if f >= 0)
        assert held == keep
        cache.advance(n)
    assert cache.frames_done == total


def test_block_causal_mask_matches_the_ring():
    """The full-sequence mask lets chunk c see exactly the frames the ring holds while chunk c runs."""
    frames, chunk, window, sink = 17, 3, 7, 2
    mask = block_causal_mask(frames, 1, chunk, window=window, sink=sink)
    for f in range(frames):
        end = min((f // chunk + 1) * chunk, frames)
        expect = [j for j in range(end) if j < sink or j >= max(sink, end - window)]
        assert mask[f].nonzero().flatten().tolist() == expect


def test_cache_memory_is_constant_and_reported(cfg):
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=4, window=6, sink=1)
    expected = 2 * cfg.num_layers * 1 * 7 * 4 * cfg.num_heads * cfg.head_dim * 4  # K and V, fp32
    expected += 2 * cfg.num_layers * cfg.num_heads * cfg.text_len * cfg.head_dim * 4
    expected += 7 * 8 + 8 + 4 * 8 + 8  # slot_frame, chunk_start, token offsets, rope_shift (int64)
    assert cache.nbytes == expected
    ptr = cache.k.data_ptr()
    for _ in range(40):
        cache.write(
            0,
            cache.plan(1, 3, 4),
            torch.randn(1, 12, cfg.num_heads, cfg.head_dim),
            torch.randn(1, 12, cfg.num_heads, cfg.head_dim),
        )
        cache.advance(3)
    assert cache.k.data_ptr() == ptr and cache.nbytes == expected  # written in place, never reallocated
    assert "MiB" in cache.memory_report()


def test_cache_errors(model, cfg):
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=4, window=3)
    with pytest.raises(RuntimeError, match="no text context"):
        model.forward_chunk(torch.randn(1, cfg.in_channels, 2, 4, 4), torch.zeros(1), cache)
    cache.set_text(model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim)))
    with pytest.raises(ValueError, match="does not fit the window"):
        cache.plan(1, 4, 4)
    with pytest.raises(ValueError, match="batch"):
        model.forward_chunk(torch.randn(2, cfg.in_channels, 2, 4, 4), torch.zeros(2), cache)
    with pytest.raises(ValueError, match="window"):
        RingKVCache(cfg, batch_size=1, frame_tokens=4, window=0)
    cache.advance(cfg.rope_max_positions - 1)
    with pytest.raises(ValueError, match="RoPE table of 1024"):
        cache.plan(1, 2, 4)
    cache.plan(1, 1, 4)  # the last position is still fine
