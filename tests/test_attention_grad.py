"""Two-part attention of training rollouts (ring in place without gradient + the chunk's own K/V with gradient,
merged by log-sum-exp) against plain softmax attention over the concatenated keys: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from sfpp.engine.attention import cache_and_chunk_attention
from sfpp.engine.cache import RingKVCache
from sfpp.models.dit import WanConfig, WanModel


def _reference(q, k_cache, v_cache, valid, k_new, v_new):
    k = torch.cat([k_cache[:, valid], k_new], 1)
    v = torch.cat([v_cache[:, valid], v_new], 1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.mark.parametrize("block, empty_cache", [(7, False), (16, False), (5, True)])
def test_cache_and_chunk_attention_matches_plain_attention(block, empty_cache):
    g = torch.Generator().manual_seed(block)
    B, Lq, Lk, H, D = 2, 12, 37, 3, 8  # ragged: 37 ring rows in tiles of 7 / 16 / 5
    q, k_new, v_new = (torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    valid = torch.rand(Lk, generator=g) < (0.0 if empty_cache else 0.6)
    grad_out = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)

    leaves = [x.clone().requires_grad_() for x in (q, k_new, v_new)]
    ours = cache_and_chunk_attention(leaves[0], k_cache, v_cache, valid, leaves[1], leaves[2], block)
    ours.backward(grad_out)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k_new, v_new)]
    ref = _reference(ref_leaves[0], k_cache, v_cache, valid, ref_leaves[1], ref_leaves[2])
    ref.backward(grad_out)
    # fp64 inputs, fp32 internal math (as on the GPU path): fp32 bounds
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def _tiny_student():
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=16,
                    text_len=4, freq_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = WanModel(cfg)
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=4, window=12)  # ring 2x larger than any activation
    with torch.no_grad():
        cache.set_text(model.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim)))
        for _ in range(5):  # fill and wrap the ring: 15 frames through 12 slots
            x = torch.randn(1, 4, 3, 4, 4)
            model.forward_chunk(x, torch.full((1, 3), 500.0), cache)
            cache.advance(3)
    return model, cache


def test_forward_chunk_with_gradients_reads_the_ring_in_place():
    """A forward with gradients gives the inference forward's output, saves no copy of the ring for the backward,
    and writes nothing into it."""
    model, cache = _tiny_student()
    x, t = torch.randn(1, 4, 3, 4, 4), torch.full((1, 3), 700.0)
    ring_before = cache.k.clone()
    saved_bytes = []
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *cache.buffers()]}

    def pack(tensor):  # activations saved for the backward, not weights, tables or the ring itself
        if tensor.untyped_storage().data_ptr() not in owned:
            saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_chunk(x, t, cache)
    assert torch.equal(cache.k, ring_before)  # nothing written under autograd
    out.square().sum().backward()
    assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
    ring_layer_bytes = cache.k[0].numel() * cache.k.element_size()
    assert max(saved_bytes) < ring_layer_bytes  # no tensor the size of a layer's ring was saved
    with torch.no_grad():
        plain = model.forward_chunk(x, t, cache)  # writes the chunk, attends over the ring
    torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-5)


def test_fp8_cache_under_autograd_is_a_clear_error():
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    ring = torch.zeros(1, 8, 2, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cache_and_chunk_attention(q, ring, ring, torch.ones(8, dtype=torch.bool), q, q, 4)
