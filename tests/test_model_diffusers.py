"""Our Wan DiT against diffusers' independent WanTransformer3DModel on the same random weights."""

import pytest
import torch

from sfpp.models.checkpoint import convert_diffusers_to_wan, load_weights
from sfpp.models.dit import WanModel

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402


def diffusers_twin(model: WanModel):
    cfg = model.cfg
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_positions,
    )
    # diffusers' own converter from Wan's original names: an independent check of our parameter names.
    converted = convert_wan_transformer_to_diffusers(dict(model.state_dict()))
    missing, unexpected = ref.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    return ref.eval()


def inputs(cfg, batch=2, frames=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, h, w, generator=g)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, context


def diffusers_sinusoid(t, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


@torch.no_grad()
def test_bidirectional_matches_diffusers(model, monkeypatch):
    ref = diffusers_twin(model)
    x, context = inputs(model.cfg)
    t = torch.tensor([937.5, 250.0])
    theirs = ref(x, t, context, return_dict=False)[0]
    # Wan (and sfpp) compute the timestep sinusoid in float64, diffusers in float32: at t ~ 1000 that alone moves
    # outputs of size ~7 by ~3e-5. Hence a tolerance of 1e-4 here ...
    ours = model(x, t, context)
    assert ours.shape == theirs.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    # ... and with diffusers' own float32 sinusoid, agreement to float32 rounding.
    monkeypatch.setattr("sfpp.models.dit.sinusoidal_embedding", diffusers_sinusoid)
    torch.testing.assert_close(model(x, t, context), theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_per_frame_timesteps_match_diffusers_per_token(model, monkeypatch):
    monkeypatch.setattr("sfpp.models.dit.sinusoidal_embedding", diffusers_sinusoid)
    """Per-frame timesteps [B, F] equal diffusers' per-token timesteps (the Wan2.2 path) expanded over each frame."""
    ref = diffusers_twin(model)
    x, context = inputs(model.cfg, frames=4)
    t = torch.tensor([[1000.0, 800.0, 333.0, 0.0], [10.0, 500.0, 625.0, 999.0]])
    tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    ours = model(x, t, context)
    theirs = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), context, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_short_context_is_zero_padded_like_wan(model):
    """A context shorter than text_len is zero-padded (Wan pads, and attends to the padding)."""
    x, context = inputs(model.cfg)
    short = context[:, :4]
    padded = torch.cat([short, torch.zeros_like(context[:, 4:])], dim=1)
    t = torch.tensor([500.0, 500.0])
    torch.testing.assert_close(model(x, t, short), model(x, t, padded))


def test_diffusers_layout_loads(model, cfg):
    """Our diffusers->Wan converter inverts diffusers' Wan->diffusers converter, and load_weights accepts both."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    in_diffusers = convert_wan_transformer_to_diffusers(dict(sd))
    back = convert_diffusers_to_wan(in_diffusers)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    fresh = load_weights(WanModel(cfg), in_diffusers)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
