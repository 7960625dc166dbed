"""Public Wan students with one flag: LoRA merged at load (checked against peft's own merge), LongLive's layout
(a base `generator` plus a `generator_lora`) through --checkpoint/--lora, the presets table, and one-line errors
for a wrong or partial file. Tiny random Wan2.1 directories written here (test_wan_loading's)."""

import copy

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.cli import main
from sfpp.models.checkpoint import CheckpointError
from sfpp.models.dit import WanModel
from sfpp.models.lora import load_lora, read_lora
from sfpp.models.students import STUDENTS, detect_student
from sfpp.pipeline import Pipeline

peft = pytest.importorskip("peft")
from test_wan_loading import CFG, parts, wan_dir  # noqa: E402, F401  (the tiny Wan2.1 directory fixtures)

TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]  # every linear of the attention and the FFN, as LongLive adapts


def peft_adapted(base: WanModel, rank: int, alpha: float, seed: int = 0):
    """(peft's model with random adapters over a copy of `base`, its adapter state dict as peft saves it)."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft starts B at zero: an adapter that changes nothing would test nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, peft.get_peft_model_state_dict(model)


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (3, 3.0), (8, 2.0)])
def test_merge_equals_peft(rank, alpha, tmp_path):
    base = randomize_(WanModel(TEST_CONFIG), seed=1).eval()
    adapted, adapter = peft_adapted(base, rank, alpha)
    torch.save({"generator_lora": adapter, "critic_lora": {}}, tmp_path / "lora.pt")
    ours = load_lora(copy.deepcopy(base), tmp_path / "lora.pt", alpha)
    reference = adapted.merge_and_unload()
    theirs = reference.state_dict()
    changed = 0
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6)
        changed += not torch.equal(value, base.state_dict()[key])
    assert changed == 10 * TEST_CONFIG.num_layers  # per block: q k v o of self- and cross-attention, ffn.0, ffn.2


def test_bad_lora_files_are_one_line_errors(tmp_path):
    base = randomize_(WanModel(TEST_CONFIG), seed=1)
    _, adapter = peft_adapted(base, 4, 4.0)
    other = {k.replace("blocks.0.", "blocks.7."): v for k, v in adapter.items()}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not have as linears: \\['blocks.7"):
        load_lora(copy.deepcopy(base), tmp_path / "other.pt")
    half = {k: v for k, v in adapter.items() if "lora_B" not in k or "blocks.1.ffn.2" not in k}
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match="blocks.1.ffn.2 has no lora_B"):
        read_lora(tmp_path / "half.pt")
    torch.save(base.state_dict(), tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="is not a LoRA weight.*--checkpoint"):
        read_lora(tmp_path / "full.pt")
    small = peft_adapted(randomize_(WanModel(TEST_CONFIG), seed=2), 4, 4.0)[1]
    wrong = {k: (v[:, :-1] if "lora_A" in k else v) for k, v in small.items()}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="do not fit its weight"):
        load_lora(copy.deepcopy(base), tmp_path / "wrong.pt")


@pytest.fixture(scope="module")
def longlive_files(parts, tmp_path_factory):  # noqa: F811
    """LongLive's release layout with tiny random weights: longlive_base.pt {generator} and lora.pt
    {generator_lora, critic_lora}, key names as their code writes them."""
    d = tmp_path_factory.mktemp("longlive")
    base = randomize_(WanModel(CFG), seed=3, scale=0.1).eval()
    torch.save({"generator": {f"model.{k}": v for k, v in base.state_dict().items()}}, d / "longlive_base.pt")
    adapted, adapter = peft_adapted(base, 4, 256.0)
    torch.save({"generator_lora": adapter, "critic_lora": {}}, d / "lora.pt")
    return d, adapted.merge_and_unload().eval()


def test_longlive_round_trips_through_lora_to_the_adapted_model(wan_dir, longlive_files, tmp_path, capsys):  # noqa: F811
    d, merged = longlive_files
    pipe = Pipeline.from_pretrained(wan_dir, checkpoint=d / "longlive_base.pt", lora=d / "lora.pt")
    assert pipe.student == "longlive"  # detected: a LoRA over a plain generator
    s, preset = pipe.settings, STUDENTS["longlive"]
    assert (s.frames_per_chunk, s.window, s.sink) == (preset.frames_per_chunk, preset.window, preset.sink)
    assert pipe.schedule.denoising_steps == preset.denoising_steps
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[key], rtol=0, atol=1e-6)
    settings = pipe.settings.__class__(**{**pipe.settings.__dict__, "height": 32, "width": 32})
    pipe.settings = settings
    ours = pipe("a red ball", num_frames=9, seed=0, progress=False).frames
    reference = Pipeline.from_pretrained(wan_dir, settings=settings)
    reference.transformer.load_state_dict(merged.state_dict())
    reference.schedule = preset.schedule
    theirs = reference("a red ball", num_frames=9, seed=0, progress=False).frames
    torch.testing.assert_close(ours, theirs, atol=1, rtol=0)  # uint8 frames: at most one level of rounding
    out = tmp_path / "v.mp4"
    cli = ["generate", "-p", "a red ball", "-n", "9", "--height", "32", "--width", "32", "--quiet", "-o", str(out),
           "--model", str(wan_dir), "--student", "longlive", "--checkpoint", str(d / "longlive_base.pt")]  # fmt: skip
    assert main([*cli, "--lora", str(d / "lora.pt")]) == 0 and out.is_file()
    assert main(cli) == 2 and "plus a LoRA: give lora=" in capsys.readouterr().err  # never a silent base model
    assert main([*cli[:-2], "--checkpoint", str(d / "lora.pt")]) == 2
    assert "is a LoRA adapter (generator_lora): pass it as lora=" in capsys.readouterr().err
    assert main(["generate", "-p", "x", "--lora", str(d / "lora.pt"), "-o", str(out)]) == 2
    assert "goes with --model WAN_DIR" in capsys.readouterr().err


def test_presets(wan_dir, tmp_path, capsys):  # noqa: F811
    assert detect_student({"generator", "generator_ema"}, lora=False).name == "self-forcing"
    assert detect_student({"generator"}, lora=True).name == "longlive"
    assert detect_student(set(), lora=False) is None
    with pytest.raises(SystemExit):
        main(["generate", "--list-students"])
    listed = capsys.readouterr().out
    for s in STUDENTS.values():
        assert s.name in listed and s.source in listed and s.command() in listed
    ckpt = {"generator_ema": randomize_(WanModel(CFG), seed=4).state_dict()}
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    pipe = Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "self_forcing_dmd.pt")
    assert pipe.student == "self-forcing" and (pipe.settings.window, pipe.settings.sink) == (21, 0)
    pipe = Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "self_forcing_dmd.pt", student="self-forcing",
                                    settings=pipe.settings.__class__(window=6))  # fmt: skip
    assert pipe.settings.window == 6  # the caller's settings win over the preset's
    with pytest.raises(ValueError, match="unknown student 'selfforcing'"):
        Pipeline.from_pretrained(wan_dir, student="selfforcing")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "-p", "x", "--student", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_causvid_layout_loads_with_its_unwarped_schedule(wan_dir, tmp_path, monkeypatch):  # noqa: F811
    """CausVid's model.pt ({generator} with the wrapper's `model.` prefix): its 3 steps reach the DiT as the
    timesteps 1000, 757, 522 (not warped by the shift), then the context pass at 0, in chunks of 3 over 21 frames."""
    from sfpp.models.dit import WanModel as Model

    weights = randomize_(WanModel(CFG), seed=5, scale=0.1).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "model.pt")
    pipe = Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "model.pt", student="causvid")
    assert pipe.student == "causvid" and (pipe.settings.frames_per_chunk, pipe.settings.window) == (3, 21)
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, weights[key].to(value.dtype)), key
    seen = []
    real = Model.forward_chunk
    monkeypatch.setattr(Model, "forward_chunk", lambda self, x, t, cache: seen.append(t.unique().tolist()) or
                        real(self, x, t, cache))  # fmt: skip
    settings = pipe.settings.__class__(**{**pipe.settings.__dict__, "height": 32, "width": 32})
    pipe.settings = settings
    pipe("a red ball", num_frames=9, seed=0, progress=False)
    assert seen[:4] == [[1000.0], [757.0], [522.0], [0.0]]
    assert Pipeline.from_pretrained(wan_dir, checkpoint=tmp_path / "model.pt").student is None  # not detected
