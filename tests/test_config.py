"""Named configs and Wan's checkpoint parameter names, checked on the meta device (no memory)."""

import pytest
import torch

from sfpp.models.dit import CONFIGS, WanConfig, WanModel, get_config


def wan_checkpoint_keys(num_layers: int) -> set[str]:
    """The tensor names of Wan2.1-T2V's `diffusion_pytorch_model.safetensors` (original layout), written out."""
    keys = {
        "patch_embedding.weight",
        "patch_embedding.bias",
        "text_embedding.0.weight",
        "text_embedding.0.bias",
        "text_embedding.2.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_embedding.0.bias",
        "time_embedding.2.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "time_projection.1.bias",
        "head.head.weight",
        "head.head.bias",
        "head.modulation",
    }
    for i in range(num_layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys |= {f"{b}.{attn}.{proj}.weight", f"{b}.{attn}.{proj}.bias"}
            keys |= {f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"}
        keys |= {f"{b}.norm3.weight", f"{b}.norm3.bias", f"{b}.modulation"}
        keys |= {f"{b}.ffn.0.weight", f"{b}.ffn.0.bias", f"{b}.ffn.2.weight", f"{b}.ffn.2.bias"}
    return keys


def test_wan_1_3b_parameter_names_and_shapes():
    cfg = get_config("wan2.1-1.3b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers) == (1536, 8960, 12, 128, 30)
    assert cfg.rope_split == (44, 42, 42)
    with torch.device("meta"):
        model = WanModel(cfg)
    sd = model.state_dict()
    assert all(v.is_meta for v in sd.values())
    assert set(sd) == wan_checkpoint_keys(30)
    shapes = {
        "patch_embedding.weight": (1536, 16, 1, 2, 2),
        "text_embedding.0.weight": (1536, 4096),
        "time_embedding.0.weight": (1536, 256),
        "time_projection.1.weight": (9216, 1536),
        "blocks.0.ffn.0.weight": (8960, 1536),
        "blocks.29.modulation": (1, 6, 1536),
        "blocks.7.self_attn.norm_q.weight": (1536,),
        "head.head.weight": (64, 1536),
        "head.modulation": (1, 2, 1536),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_wan_1_3b_shapes_match_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    from sfpp.models.checkpoint import convert_diffusers_to_wan

    with torch.device("meta"):
        ours = WanModel(get_config("wan2.1-1.3b")).state_dict()
        ref = diffusers.WanTransformer3DModel(
            num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30
        ).state_dict()
    ref = convert_diffusers_to_wan(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert 1.2e9 < sum(v.numel() for v in ours.values()) < 1.5e9  # "1.3B"


def test_14b_config():
    cfg = get_config("wan2.1-14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.head_dim) == (5120, 13824, 40, 40, 128)
    with torch.device("meta"):
        assert set(WanModel(cfg).state_dict()) == wan_checkpoint_keys(40)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown model config 'wan3'.*wan2.1-1.3b"):
        get_config("wan3")


def test_bad_config_values():
    with pytest.raises(ValueError, match="not divisible"):
        WanConfig(dim=100, num_heads=12)
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        WanConfig.from_dict({"dim": 64, "num_head": 4})
    assert WanConfig.from_dict({"patch_size": [1, 2, 2]}) == CONFIGS["wan2.1-1.3b"]
