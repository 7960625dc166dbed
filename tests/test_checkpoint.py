"""Checkpoints that do not fit give errors that name the problem."""

import pytest
import torch
from safetensors.torch import save_file

from sfpp.models.checkpoint import CheckpointError, load_file, load_weights
from sfpp.models.dit import WanModel
from sfpp.pipeline import Pipeline


def test_missing_keys(model, cfg):
    sd = dict(model.state_dict())
    del sd["blocks.1.cross_attn.k.weight"], sd["head.modulation"]
    with pytest.raises(CheckpointError, match=r"2 missing keys \(blocks.1.cross_attn.k.weight, head.modulation\)"):
        load_weights(WanModel(cfg), sd)


def test_unexpected_and_mismatched(model, cfg):
    sd = dict(model.state_dict())
    sd["blocks.9.self_attn.q.weight"] = torch.zeros(3)
    sd["patch_embedding.weight"] = torch.zeros(48, 8, 1, 2, 2)
    with pytest.raises(CheckpointError) as info:
        load_weights(WanModel(cfg), sd, source="ckpt.safetensors")
    msg = str(info.value)
    assert "ckpt.safetensors does not match the model" in msg
    assert "1 unexpected keys (blocks.9.self_attn.q.weight)" in msg
    assert "patch_embedding.weight: model (48, 16, 1, 2, 2) vs ckpt.safetensors (48, 8, 1, 2, 2)" in msg


def test_wrong_model_size(cfg):
    small = WanModel(cfg).state_dict()
    with torch.device("meta"):
        from sfpp.models.dit import get_config

        big = WanModel(get_config("wan2.1-1.3b"))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(big, small)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="could not read checkpoint .*bad.safetensors"):
        load_file(bad)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not read"):
        load_file(bad_pt)


def test_pt_and_safetensors_load_the_same(model, tmp_path):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    a, b = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "m.pt")
    assert all(torch.equal(a[k], b[k]) for k in sd)


def test_pipeline_directory_with_a_bad_part(tmp_path):
    pipe = Pipeline.from_config("tiny")
    pipe.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="sfpp_pipeline.json is missing"):
        Pipeline.from_pretrained(tmp_path / "elsewhere")
    sd = load_file(tmp_path / "transformer.safetensors")
    del sd["blocks.0.ffn.0.bias"]
    save_file(sd, str(tmp_path / "transformer.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer.safetensors does not match.*blocks.0.ffn.0.bias"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "text_encoder.safetensors").unlink()
    (tmp_path / "transformer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found.*transformer.safetensors"):
        Pipeline.from_pretrained(tmp_path)
