"""Wan2.1-14B: its config read from Wan's and diffusers' files, and a stand-in of its head layout (40 heads, a tiny
width) loading from Wan's original layout, the diffusers layout and a Self-Forcing-format student checkpoint. The
real 14B is checked on the meta device only (no weights)."""

from dataclasses import replace

import pytest
import torch
from conftest import randomize_

from sfpp.models.checkpoint import CheckpointError
from sfpp.models.dit import CONFIGS, WanConfig, WanModel
from sfpp.models.vae import WanVAE, WanVAEConfig
from sfpp.models.wan_checkpoints import config_from_diffusers, config_from_wan
from sfpp.pipeline import Pipeline, StreamSettings

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_umt5 import DIM as T5_DIM  # noqa: E402
from test_umt5 import wan_t5_state_dict  # noqa: E402
from test_wan_loading import assert_same_weights, write_diffusers_layout, write_wan_layout  # noqa: E402

# Wan2.1-T2V-14B's config.json, and its diffusers transformer/config.json (Wan-AI/Wan2.1-T2V-14B(-Diffusers)).
WAN_14B_CONFIG = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
                  "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
                  "num_layers": 40, "out_dim": 16, "text_len": 512}  # fmt: skip
DIFFUSERS_14B_CONFIG = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
                        "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": None,
                        "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
                        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                        "text_dim": 4096}  # fmt: skip
# 14B's heads (40) at head_dim 8; the text width of the tiny umT5.
CFG = replace(CONFIGS["tiny-14b"], text_dim=T5_DIM, text_len=512, freq_dim=32)
SETTINGS = StreamSettings(frames_per_chunk=2, window=4, height=32, width=32)


def test_14b_config_from_wan_and_diffusers_files():
    assert config_from_wan(WAN_14B_CONFIG) == CONFIGS["wan2.1-14b"]
    assert config_from_diffusers({k: v for k, v in DIFFUSERS_14B_CONFIG.items() if k != "qk_norm"}) == CONFIGS[
        "wan2.1-14b"
    ]
    with torch.device("meta"):
        model = WanModel(CONFIGS["wan2.1-14b"])
    params = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < params < 14.5e9, params  # Wan2.1-T2V-14B: 14.29 billion
    assert (CONFIGS["wan2.1-14b"].num_heads, CONFIGS["wan2.1-14b"].head_dim) == (40, 128)
    assert CFG.num_heads == 40 and CFG.dim == 320


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return randomize_(WanModel(CFG), scale=0.1).eval(), WanVAE(WanVAEConfig(base_dim=8)).eval(), wan_t5_state_dict()


@pytest.fixture(scope="module")
def wan_dir(parts, tmp_path_factory):
    return write_wan_layout(tmp_path_factory.mktemp("Wan2.1-T2V-14B-standin"), CFG, *parts)


def test_14b_layout_from_wan_diffusers_and_a_student(parts, wan_dir, tmp_path):
    dit, vae, t5 = parts
    wan = Pipeline.from_pretrained(wan_dir, settings=SETTINGS)
    assert wan.transformer.cfg == CFG  # read from config.json: 40 heads
    assert_same_weights(wan.transformer, dit)
    (tmp_path / "diffusers").mkdir()
    write_diffusers_layout(tmp_path / "diffusers", dit, t5, vae)
    diff = Pipeline.from_pretrained(tmp_path / "diffusers", settings=SETTINGS)
    assert diff.transformer.cfg == CFG
    assert_same_weights(diff.transformer, dit)
    a = wan("a red ball", num_frames=9, seed=1, progress=False)
    b = diff("a red ball", num_frames=9, seed=1, progress=False)
    torch.testing.assert_close(a.latents, b.latents)
    # A Self-Forcing-format student of this size (generator_ema, FSDP-era `model.` prefixes) over the directory.
    student = randomize_(WanModel(CFG), seed=7)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in student.state_dict().items()}}, tmp_path / "sf.pt")
    loaded = Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "sf.pt", settings=SETTINGS)
    assert_same_weights(loaded.transformer, student)
    assert loaded("a red ball", num_frames=5, seed=1, progress=False).frames.shape == (1, 5, 32, 32, 3)
    # A 1.3B-shaped student (other width) over the 14B directory: one sentence, not 300 shape errors.
    other = WanModel(WanConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, text_dim=T5_DIM, freq_dim=32))
    torch.save({"generator": other.state_dict()}, tmp_path / "small.pt")
    size = r"different model size: dim 48, 2 layers.*but the model is dim 320, 2 layers \(tiny-14b\)"
    with pytest.raises(CheckpointError, match=size):
        Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "small.pt")
