"""Loading what users have on disk: Wan2.1's original layout, the diffusers layout, Self-Forcing checkpoints, and
clear errors for missing or mismatched parts. Every directory is written here with small random weights."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file

from sfpp.models.checkpoint import CheckpointError
from sfpp.models.dit import WanConfig, WanModel
from sfpp.models.vae import WanVAE, WanVAEConfig
from sfpp.models.wan_checkpoints import convert_diffusers_vae_to_wan, generator_state_dict, read_weights
from sfpp.pipeline import Pipeline, StreamSettings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from test_umt5 import DIM as T5_DIM  # noqa: E402
from test_umt5 import make_tokenizer, wan_t5_state_dict  # noqa: E402

# A DiT whose text_dim is the tiny umT5's width; Wan2.1's VAE structure at base_dim 8.
CFG = WanConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, text_dim=T5_DIM, freq_dim=32)  # text_len 512
SETTINGS = StreamSettings(frames_per_chunk=2, window=4, height=32, width=32)


def wan_config_json(cfg):  # Wan's own config.json fields
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": cfg.dim, "eps": cfg.eps,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": 16, "model_type": "t2v",
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": 16, "text_len": cfg.text_len,
            "text_dim": cfg.text_dim}  # fmt: skip


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    dit = randomize_(WanModel(CFG), scale=0.1).eval()
    vae = WanVAE(WanVAEConfig(base_dim=8)).eval()
    return dit, vae, wan_t5_state_dict()


@pytest.fixture(scope="module")
def wan_dir(parts, tmp_path_factory):
    return write_wan_layout(tmp_path_factory.mktemp("Wan2.1-T2V-tiny"), CFG, *parts)


def write_wan_layout(d, cfg, dit, vae, t5):
    """Wan's original directory layout in `d`: config.json, the DiT's safetensors, the VAE's and umT5's .pth files
    and the tokenizer."""
    (d / "config.json").write_text(json.dumps(wan_config_json(cfg)))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(d / "diffusion_pytorch_model.safetensors"))
    torch.save(vae.state_dict(), d / "Wan2.1_VAE.pth")
    torch.save(t5, d / "models_t5_umt5-xxl-enc-bf16.pth")
    make_tokenizer(d / "google" / "umt5-xxl")
    return d


def assert_same_weights(model, reference):
    theirs = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_wan_original_layout(wan_dir, parts):
    dit, vae, _ = parts
    pipe = Pipeline.from_pretrained(wan_dir, settings=SETTINGS)
    assert type(pipe.decoder).__name__ == "WanVAE" and type(pipe.text_encoder).__name__ == "UMT5TextEncoder"
    assert pipe.transformer.cfg == CFG and pipe.text_encoder.text_len == CFG.text_len
    assert_same_weights(pipe.transformer, dit)
    assert_same_weights(pipe.decoder, vae)
    chunks = list(pipe.stream("a red ball", num_frames=9, seed=0, progress=False))
    assert [c.shape for c in chunks] == [(1, 5, 32, 32, 3), (1, 4, 32, 32, 3)]  # 1 + 4, then 4 per latent frame


def test_self_forcing_checkpoint(wan_dir, parts, tmp_path):
    dit, _, _ = parts
    ema = randomize_(WanModel(CFG), seed=5)
    plain = randomize_(WanModel(CFG), seed=6)
    ckpt = {
        "generator": {f"model.{k}": v for k, v in plain.state_dict().items()},
        "generator_ema": {f"model.{k}": v for k, v in ema.state_dict().items()},
        "critic": {"x": torch.zeros(1)},
    }
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    assert_same_weights(Pipeline.from_pretrained(wan_dir, tmp_path / "self_forcing_dmd.pt").transformer, ema)
    loaded = Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "self_forcing_dmd.pt", ema=False)
    assert_same_weights(loaded.transformer, plain)
    # Only `generator`, no prefix: fine too.
    torch.save({"generator": plain.state_dict()}, tmp_path / "g.pt")
    assert_same_weights(Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "g.pt").transformer, plain)
    with pytest.raises(CheckpointError, match="neither `generator` nor `generator_ema`.*'critic', 'step'"):
        torch.save({"critic": {"x": torch.zeros(1)}, "step": 3}, tmp_path / "bad.pt")
        Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "bad.pt")


def test_wrong_model_size_checkpoint(wan_dir, tmp_path):
    bigger = WanModel(replace(CFG, num_layers=3))
    torch.save({"generator": bigger.state_dict()}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"different model size: dim 48, 3 layers, but the model is dim 48, 2"):
        Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "big.pt")
    sd = generator_state_dict({"generator": {"model._fsdp_wrapped_module.blocks.0.x": torch.zeros(1)}})
    assert list(sd) == ["blocks.0.x"]


@pytest.mark.parametrize(
    "remove,match",
    [
        ("Wan2.1_VAE.pth", r"missing the VAE: Wan2.1_VAE.pth not found"),
        ("models_t5_umt5-xxl-enc-bf16.pth", r"missing the umT5 text encoder: models_t5_umt5-xxl-enc-bf16.pth"),
        ("google", r"missing the umT5 tokenizer folder: umt5-xxl not found"),
        ("diffusion_pytorch_model.safetensors", r"DiT weights not found: .*diffusion_pytorch_model.safetensors"),
    ],
)
def test_missing_parts_are_named(wan_dir, tmp_path, remove, match):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(wan_dir, d)
    target = d / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=match):
        Pipeline.from_pretrained(d)


def test_mismatched_parts(wan_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(wan_dir, d)
    (d / "config.json").write_text(json.dumps({**wan_config_json(CFG), "text_dim": 24}))
    with pytest.raises(CheckpointError, match="text_embedding.0.weight: model \\(48, 24\\) vs"):
        Pipeline.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**wan_config_json(CFG), "model_type": "i2v"}))
    with pytest.raises(ValueError, match="model_type 'i2v' is not supported"):
        Pipeline.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="not an sfpp model directory.*Wan2.1 directory.*diffusers"):
        Pipeline.from_pretrained(tmp_path / "nothing")


def test_sharded_weights_and_cast_on_read(parts, tmp_path):
    dit, _, _ = parts
    sd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(wan_config_json(CFG)))
    from sfpp.models.wan_checkpoints import _dit

    model = _dit(CFG, tmp_path, dtype=torch.bfloat16, load_weights=True)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert torch.equal(model.head.modulation, dit.head.modulation.bfloat16())
    assert read_weights(tmp_path / "a.safetensors")[keys[0]].dtype == torch.float32


def write_diffusers_layout(d, dit: WanModel, t5: dict, vae: WanVAE | None = None):
    """The diffusers layout of these weights in d, written by diffusers and transformers themselves (a random
    diffusers VAE when `vae` is None); returns the diffusers VAE."""
    import transformers

    from sfpp.models.umt5 import convert_wan_t5_to_transformers, umt5_config_from_wan

    cfg = dit.cfg
    (d / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    ref = diffusers.WanTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, rope_max_seq_len=cfg.rope_max_positions,
    )  # fmt: skip
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(dit.state_dict())), strict=True)
    ref.save_pretrained(d / "transformer")
    ref_vae = diffusers.AutoencoderKLWan(base_dim=8)
    if vae is not None:
        ref_vae.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    ref_vae.save_pretrained(d / "vae")
    t5_model = transformers.UMT5EncoderModel(umt5_config_from_wan(t5))
    t5_model.load_state_dict(convert_wan_t5_to_transformers(t5), strict=True)
    t5_model.save_pretrained(d / "text_encoder")
    make_tokenizer(d / "tokenizer")
    return ref_vae


@pytest.fixture(scope="module")
def diffusers_dir(parts, tmp_path_factory):
    dit, vae, t5 = parts
    d = tmp_path_factory.mktemp("Wan2.1-T2V-tiny-Diffusers")
    return d, write_diffusers_layout(d, dit, t5, vae)


def test_diffusers_layout(diffusers_dir, wan_dir, parts):
    d, ref_vae = diffusers_dir
    dit, vae, _ = parts
    pipe = Pipeline.from_pretrained(d, settings=SETTINGS)
    assert pipe.transformer.cfg == CFG
    assert_same_weights(pipe.transformer, dit)
    assert_same_weights(pipe.decoder, vae)  # through our diffusers -> Wan VAE renaming
    # The same video as from Wan's original layout.
    a = Pipeline.from_pretrained(wan_dir, settings=SETTINGS)("a red ball", num_frames=5, seed=1, progress=False)
    b = pipe("a red ball", num_frames=5, seed=1, progress=False)
    torch.testing.assert_close(a.latents, b.latents)
    assert torch.equal(a.frames, b.frames)


def test_vae_renaming_inverts_diffusers(parts):
    _, vae, _ = parts
    sd = dict(vae.state_dict())
    back = convert_diffusers_vae_to_wan(convert_wan_vae_to_diffusers(dict(sd)))
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_sfpp_directory_with_wan_parts_round_trip(wan_dir, tmp_path):
    """save_pretrained of a Wan pipeline names its parts by type ("umt5", "wan-vae") and loads back the same."""
    pipe = Pipeline.from_pretrained(wan_dir, settings=SETTINGS)
    pipe.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "sfpp_pipeline.json").read_text())
    assert meta["text_encoder"]["type"] == "umt5" and meta["decoder"]["type"] == "wan-vae"
    again = Pipeline.from_pretrained(tmp_path / "m")
    a = pipe("a red ball", num_frames=5, seed=2, progress=False)
    b = again("a red ball", num_frames=5, seed=2, progress=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
