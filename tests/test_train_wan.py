"""The wan2.1-1.3b recipe end to end at a reduced size, from files on disk as users have them: a Wan2.1 directory in
Wan's own layout (random DiT, tiny umT5 and tokenizer, tiny VAE), a prompt file, and a Self-Forcing checkpoint."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file

from sfpp.models.dit import WanConfig, WanModel
from sfpp.models.vae import WanVAE, WanVAEConfig
from train.common import Dist
from train.config import DMDConfig, GRPOConfig, ODEConfig, extended_dmd, get_recipe
from train.stages import STAGES, run_stage

pytest.importorskip("transformers")
pytest.importorskip("cv2")
from test_umt5 import DIM as T5_DIM  # noqa: E402
from test_umt5 import make_tokenizer, wan_t5_state_dict  # noqa: E402

CFG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=T5_DIM, freq_dim=32)  # text_len 512
PROMPTS = ["a red ball bounces", "two blue cubes on the floor", "the red cubes"]


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("Wan2.1-T2V-tiny")
    torch.manual_seed(0)
    dit = randomize_(WanModel(CFG), scale=0.05)
    (d / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": CFG.dim, "eps": CFG.eps,
        "ffn_dim": CFG.ffn_dim, "freq_dim": CFG.freq_dim, "in_dim": 16, "model_type": "t2v", "num_heads": CFG.num_heads,
        "num_layers": CFG.num_layers, "out_dim": 16, "text_len": CFG.text_len, "text_dim": CFG.text_dim}))  # fmt: skip
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(d / "diffusion_pytorch_model.safetensors"))
    torch.save(WanVAE(WanVAEConfig(base_dim=8)).state_dict(), d / "Wan2.1_VAE.pth")
    torch.save(wan_t5_state_dict(), d / "models_t5_umt5-xxl-enc-bf16.pth")
    make_tokenizer(d / "google" / "umt5-xxl")
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is skipped
    return d, prompts, dit


def tiny_recipe(wan_dir, prompts, **overrides):
    """wan2.1-1.3b with the tiny DiT, 16x32-pixel frames (2x4 latents), a 3-frame horizon and window."""
    recipe = get_recipe("wan2.1-1.3b")
    assert recipe.latent_hw == (60, 104) and recipe.wan and recipe.extended.grad_step == "last"
    small = dict(steps=1, batch_size=1, critic_per_gen=1, ema_start=0)
    return replace(
        recipe,
        model=CFG,
        frame_size=16,
        frame_width=32,
        horizon=3,
        window=3,
        wan_dir=str(wan_dir),
        prompt_file=str(prompts),
        ode=ODEConfig(trajectories=2, euler_steps=4, steps=1, batch_size=1),
        self_forcing=DMDConfig(rollout_frames=3, **small),
        extended=extended_dmd(rollout_frames=9, **small),
        grpo=GRPOConfig(steps=1, prompts_per_step=1, group_size=2, rollout_frames=3, inner_epochs=1),
        **overrides,
    )


def test_every_stage_runs_from_wan_files(wan_files, tmp_path):
    wan_dir, prompts, dit = wan_files
    recipe = tiny_recipe(wan_dir, prompts)
    histories = {name: run_stage(name, recipe, tmp_path, Dist()) for name in STAGES}
    final = tmp_path / "teacher" / "final"
    emb = load_file(final / "prompts.safetensors")
    assert emb["prompts"].shape == (3, 512, T5_DIM) and emb["uncond"].shape == (1, 512, T5_DIM)
    assert json.loads((final / "prompts.json").read_text()) == PROMPTS
    assert emb["prompts"][0, :5].abs().sum() > 0 and emb["prompts"][0, 10:].abs().sum() == 0  # padding zeroed
    assert not (tmp_path / "teacher" / "final" / "teacher.safetensors").exists()  # the teacher stays in wan_dir
    student = load_file(tmp_path / "ode" / "final" / "student.safetensors")
    assert not torch.equal(student["head.head.weight"], dit.state_dict()["head.head.weight"])  # one ODE step moved it
    for name in ("ode", "dmd", "extended", "grpo"):
        assert histories[name] and all(np.isfinite(v) for h in histories[name] for v in h.values()), name
    assert "reward" in histories["grpo"][0]  # through the Wan VAE's pixels


def test_self_forcing_checkpoint_replaces_ode_init(wan_files, tmp_path):
    wan_dir, prompts, _ = wan_files
    torch.manual_seed(1)
    sf = randomize_(WanModel(CFG), seed=1, scale=0.05)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sf.state_dict().items()}}, tmp_path / "self_forcing.pt")
    recipe = tiny_recipe(wan_dir, prompts, student_checkpoint=str(tmp_path / "self_forcing.pt"))
    for name in ("teacher", "ode"):
        run_stage(name, recipe, tmp_path / "run", Dist())
    student = load_file(tmp_path / "run" / "ode" / "final" / "student.safetensors")
    for k, v in sf.state_dict().items():
        assert torch.equal(student[k], v), k
    assert not list((tmp_path / "run" / "ode").glob("trajectories_*"))  # no teacher trajectories were sampled


def test_self_forcing_checkpoint_starts_extended_and_its_lora_export_loads(wan_files, tmp_path):
    """`extended` from a Self-Forcing `.pt` with the Wan2.1 directory as its real score (and the critic's start), in
    bf16 with LoRA: its generator starts as the checkpoint, and the stage's merged plain output loads as
    `Pipeline.from_pretrained(wan_dir, checkpoint=)`, weight for weight, moved off the checkpoint by the adapters."""
    from sfpp import Pipeline
    from train.common import full_state_dict
    from train.stages import ExtendedDMDStage

    wan_dir, prompts, dit = wan_files
    sf = randomize_(WanModel(CFG), seed=1, scale=0.05)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sf.state_dict().items()}}, tmp_path / "self_forcing.pt")
    recipe = tiny_recipe(wan_dir, prompts, student_checkpoint=str(tmp_path / "self_forcing.pt"))
    run = tmp_path / "run"
    run_stage("teacher", recipe, run, Dist())
    stage = ExtendedDMDStage(recipe, run, Dist())  # the recipe's bf16: fp32 master weights, a bf16 real score
    generator, critic = (full_state_dict(stage.models[name]) for name in ("generator", "critic"))
    for k, v in sf.state_dict().items():
        assert torch.equal(generator[k], v), k
    for k, v in dit.state_dict().items():
        assert torch.equal(critic[k], v) and torch.equal(stage.teacher.state_dict()[k], v.bfloat16()), k
    lora = replace(recipe, lora_rank=2)
    for name in ("ode", "dmd", "extended"):  # ode and dmd have nothing to train from a Self-Forcing student
        assert (run_stage(name, lora, run, Dist()) == []) == (name != "extended"), name
    exported = run / "extended" / "final" / "ema.safetensors"
    weights = load_file(exported)
    pipe = Pipeline.from_pretrained(wan_dir, checkpoint=exported, dtype=torch.float32)
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, weights[k]), k
    q = "blocks.0.self_attn.q.weight"
    assert not torch.equal(weights[q], sf.state_dict()[q])  # the merged adapter
    assert torch.equal(weights["head.head.weight"], sf.state_dict()["head.head.weight"])  # no adapter there


def test_cached_prompt_embeddings_belong_to_their_prompt_file(wan_files, tmp_path):
    wan_dir, prompts, _ = wan_files
    recipe = tiny_recipe(wan_dir, prompts)
    run_stage("teacher", recipe, tmp_path, Dist())
    run_stage("teacher", recipe, tmp_path, Dist())  # the same inputs: the cached embeddings are reused
    other = tmp_path / "other.txt"
    other.write_text("a green cone\n")
    with pytest.raises(ValueError, match="holds the embeddings of other prompts"):
        run_stage("ode", replace(recipe, prompt_file=str(other)), tmp_path, Dist())


def test_wan_recipe_needs_its_files(tmp_path):
    recipe = get_recipe("wan2.1-1.3b")
    assert recipe.model.dim == 1536 and recipe.horizon == recipe.window == 21
    with torch.device("meta"):
        WanModel(recipe.model)  # the full-size model is constructible
    with pytest.raises(ValueError, match="--wan-dir DIR and --prompts FILE"):
        run_stage("teacher", get_recipe("wan2.1-1.3b"), tmp_path, Dist())
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    from train.wan import read_prompts

    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(empty)


def test_diffusers_layout_gives_the_same_inputs(wan_files, tmp_path):
    """The same teacher and prompt embeddings from the diffusers layout of the same weights."""
    pytest.importorskip("diffusers")
    from test_wan_loading import write_diffusers_layout

    from train import wan

    wan_dir, prompts, dit = wan_files
    d = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    d.mkdir()
    write_diffusers_layout(d, dit, wan_t5_state_dict())

    ours, theirs = tiny_recipe(wan_dir, prompts), tiny_recipe(d, prompts)
    expected = wan.teacher(ours, torch.device("cpu")).state_dict()
    for k, v in wan.teacher(theirs, torch.device("cpu")).state_dict().items():
        torch.testing.assert_close(v, expected[k])
    run_stage("teacher", ours, tmp_path / "a", Dist())
    run_stage("teacher", theirs, tmp_path / "b", Dist())
    a = load_file(tmp_path / "a" / "teacher" / "final" / "prompts.safetensors")
    b = load_file(tmp_path / "b" / "teacher" / "final" / "prompts.safetensors")
    torch.testing.assert_close(a["prompts"], b["prompts"])
