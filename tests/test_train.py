
"""The training stack on the `smoke` recipe: the world, the codec, resumable and crash-safe checkpoints, rollouts
that carry gradients only where they should, two-process training with identical weights, and the Wan recipe."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfpp.engine.cache import RingKVCache
from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.checkpoint import CheckpointError
from sfpp.models.dit import WanModel
from train import rollout as R
from train.common import Dist, load_checkpoint, save_checkpoint
from train.config import DMDConfig, get_recipe
from train.metrics import chunk_seam, fidelity, no_repeat, smoothness_reward, window_metrics
from train.stages import SHARED_STREAM, DMDStage, ExtendedDMDStage, ODEStage, TeacherStage, run_stage, world_codec
from train.world import frames_uint8, parse_prompt, render, render_batch, sample_spec

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("cv2")


def test_world_is_deterministic_and_described():
    a, prompts = render_batch([3, 4], 5)
    b, _ = render_batch([3, 4], 5)
    assert torch.equal(a, b) and a.shape == (2, 5, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a[0], a[1])
    spec = sample_spec(3)
    assert all(o.colour in prompts[0] and o.shape in prompts[0] for o in spec.objects)
    assert not torch.equal(render(spec, 2, start=0), render(spec, 2, start=10))  # things move


def test_codec_keeps_the_world():
    codec = world_codec(get_recipe("smoke"))
    video, _ = render_batch([1, 2], 4)  # clips the codec was not fitted on
    z = codec.encode(video)
    assert z.shape == (2, 16, 4, 8, 8)
    assert 0.5 < float(z.std()) < 2.0  # standardised components
    err = (codec.decode_pixels(z) - video).abs()
    assert float(err.mean()) < 0.03  # ~1% of the [-1, 1] range; the loss sits at sharp edges
    torch.testing.assert_close(codec.encode(codec.decode_pixels(z)), z, rtol=0, atol=1e-4)  # a projection
    again = type(codec).from_meta(codec.to_meta(), Path("."))
    assert torch.equal(again.encode(video), z)


@pytest.mark.parametrize("whitening", [1.0, 0.5, 0.0])
def test_codec_whitening_sets_the_channel_variances(whitening):
    """Channel variances on the fitting frames: 1 each when whitened, the PCA eigenvalues' proportions at 0, a mean of
    1 always; the same world back (the decoder undoes the scale)."""
    recipe = replace(get_recipe("smoke"), codec_whitening=whitening)
    codec, plain = world_codec(recipe), world_codec(get_recipe("smoke"))
    video, _ = render_batch([3, 4, 5, 6], 4)
    z, eig = codec.encode(video), plain.scale**2  # eigenvalues of the components
    var = z.transpose(0, 1).flatten(1).var(1)  # [C]
    expected = eig ** (1 - whitening) / (eig ** (1 - whitening)).mean()
    assert float(var.mean()) == pytest.approx(1.0, rel=0.3)  # clips it was not fitted on
    if whitening == 1.0:
        assert 0.3 < float(var.min()) and float(var.max()) < 3.0
    else:  # the channels' spread follows the eigenvalues'
        assert float(torch.corrcoef(torch.stack([var.log(), expected.log()]))[0, 1]) > 0.9
        assert float(var.max() / var.min()) > 0.3 * float(expected.max() / expected.min())
    torch.testing.assert_close(codec.decode_pixels(z), plain.decode_pixels(plain.encode(video)), rtol=0, atol=1e-4)


def test_metrics_separate_good_from_broken_video():
    spec = sample_spec(1)
    frames = frames_uint8(render(spec, 36)).numpy()
    frozen = np.repeat(frames[:1], 36, 0)
    assert fidelity(frames, spec) > 0.6 > fidelity(frozen, spec)
    assert no_repeat(frames, 12) > 0.5 > no_repeat(frozen, 12)
    flicker = frames.copy()
    flicker[::6] = 255 - flicker[::6]  # sudden flashes: flow spikes
    assert smoothness_reward(frames, 0.25) > smoothness_reward(flicker, 0.25)


def test_chunk_seam_and_clipping_see_what_they_measure():
    spec = sample_spec(5)
    frames = frames_uint8(render(spec, 24)).numpy()
    assert 0.8 < chunk_seam(frames, 3) < 1.25  # the world has no chunks
    jumpy = frames.astype(np.int16)
    jumpy[(np.arange(24) // 3) % 2 == 1] += 20  # every other chunk brighter: a jump at every chunk boundary
    jumpy = np.clip(jumpy, 0, 255).astype(np.uint8)
    assert chunk_seam(jumpy, 3) > 3
    assert window_metrics(frames)["clipped"] < 0.05
    assert window_metrics(np.full_like(frames, 255))["clipped"] == 1.0


def test_parse_prompt_inverts_the_worlds_prompts():
    for seed in range(300):
        spec = sample_spec(seed)
        parsed = parse_prompt(spec.prompt())
        assert parsed.prompt() == spec.prompt()
        assert [(o.colour, o.shape, o.size, o.speed) for o in parsed.objects] == [
            (o.colour, o.shape, o.size, o.speed) for o in spec.objects
        ]
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a big red dragon moving fast over a plain grey background")


def test_student_steps_lie_on_the_teacher_euler_grid():
    schedule = FlowMatchSchedule()
    for steps in (8, 32, 48):
        grid = [R.shifted_sigma(1 - k / steps, schedule.shift) for k in range(0, steps, steps // 4)]
        assert grid == pytest.approx(schedule.sigmas)


def _student(window=6, context_noise=0.0, **schedule):
    cfg = get_recipe("smoke").model
    torch.manual_seed(0)
    model = WanModel(cfg)
    cache = RingKVCache(cfg, batch_size=2, frame_tokens=16, window=window)
    with torch.no_grad():
        cache.set_text(model.text_kv(torch.randn(2, cfg.text_len, cfg.text_dim)))
    return model, cache, FlowMatchSchedule(context_noise=context_noise, **schedule)


SHAPE = (2, 16, 3, 8, 8)
CORRELATED = {"frame_correlation": 0.9, "correlated_from": 2}  # noise shared by the frames from step 2 on


@pytest.mark.parametrize(
    "noise_step, exit_step, context_noise, schedule",
    [(0, 1, 0.0, {}), (2, 3, 0.0, {}), (1, 3, 100.0, {}), (1, 3, 100.0, CORRELATED)],
)
def test_window_gradient_replay_is_the_rollout(noise_step, exit_step, context_noise, schedule, monkeypatch):
    """The replay reproduces the window chunk by chunk over the wrapped ring, and its gradient is the gradient of
    two-part attention's plain reference (concatenated K/V) through the same computation."""
    model, cache, schedule = _student(context_noise=context_noise, **schedule)
    draw = R.WindowDraw(start=6, noise_step=noise_step, exit_steps=(exit_step, exit_step))
    window = R.window_rollout(model, cache, SHAPE, draw, schedule, torch.Generator().manual_seed(0))
    assert window.x0.shape == (2, 16, 6, 8, 8) and not window.x0.requires_grad and cache.frames_done == 12
    end_k = cache.k.clone()
    grad = torch.randn(window.x0.shape, generator=torch.Generator().manual_seed(1))
    replayed = R.window_backward(model, cache, window, grad, schedule)
    torch.testing.assert_close(replayed, window.x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k, end_k, rtol=1e-5, atol=1e-5)  # the same context was written
    ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert (
        ours and all(torch.isfinite(g).all() for g in ours) and model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    )

    import sfpp.models.dit

    def concat_reference(q, k_cache, v_cache, valid, k_new, v_new, block):
        k = torch.cat([k_cache[:, valid], k_new], 1).transpose(1, 2)
        v = torch.cat([v_cache[:, valid], v_new], 1).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)

    monkeypatch.setattr(sfpp.models.dit, "cache_and_chunk_attention", concat_reference)
    model.zero_grad(set_to_none=True)
    R.window_backward(model, cache, window, grad, schedule)
    theirs = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_backward_noise_initialisation_restarts_from_the_rollouts_content(monkeypatch):
    """eq. 1: each window chunk starts at sigma_s from the student's own clean rollout of that chunk,
    x = (1 - sigma_s) x0 + sigma_s eps, not from fresh noise (which step 0, sigma 1, is)."""
    model, cache, schedule = _student()
    s = 2
    sigma = schedule.sigmas[s]
    clean = R.student_rollout(model, _fresh_cache(model, cache), SHAPE, 12, schedule, torch.Generator().manual_seed(3))
    inputs = []
    forward = model.forward_chunk

    def spy(x, t, c):
        inputs.append((x.clone(), float(t[0, 0])))
        return forward(x, t, c)

    monkeypatch.setattr(model, "forward_chunk", spy)
    draw = R.WindowDraw(start=6, noise_step=s, exit_steps=(3, 3))
    R.window_rollout(model, cache, SHAPE, draw, schedule, torch.Generator().manual_seed(3))
    # the calls: 2 context chunks x 5, the window's first pass 2 x 5, then per chunk steps 2, 3 and the context pass
    starts = [x for x, t in inputs[20:] if t == pytest.approx(1000 * sigma)]
    assert len(starts) == 2
    for c, x in enumerate(starts):
        eps = (x - (1 - sigma) * clean[:, :, 6 + 3 * c : 9 + 3 * c]) / sigma
        assert 0.95 < float(eps.std()) < 1.05 and abs(float(eps.mean())) < 0.05  # what was added is unit noise
        fresh_std = float((x / sigma).std())  # had it started from fresh noise, this would be 1 / sigma
        assert fresh_std < 0.95 / sigma


def _draws(stage_cls, recipe, rank, n=20):
    """`draw_window` of a stage on a given rank, without building its models."""
    stage = object.__new__(stage_cls)
    stage.recipe, stage.schedule, stage.draws = recipe, FlowMatchSchedule(), []
    stage.env = Dist(rank=rank, world_size=2)
    stage.shared = torch.Generator().manual_seed(recipe.seed * 1000 + stage.salt + 7919 * SHARED_STREAM)
    return [stage.draw_window() for _ in range(n)]


def test_window_draws_follow_the_paper_and_agree_across_ranks():
    recipe = replace(get_recipe("smoke"), extended=replace(get_recipe("smoke").extended, rollout_frames=30))
    ext = _draws(ExtendedDMDStage, recipe, rank=0)
    assert ext == _draws(ExtendedDMDStage, recipe, rank=1)  # window starts and steps are rank-independent
    assert {d.exit_steps for d in ext} == {(3, 3)}  # Self-Forcing++: gradient at the last step
    assert len({d.start for d in ext}) > 3 and len({d.noise_step for d in ext}) > 2  # uniform windows, restarts
    assert all(d.start % 3 == 0 and d.start + 6 <= 30 for d in ext)
    sf = _draws(DMDStage, recipe, rank=0)
    assert {d.start for d in sf} == {0} and {d.noise_step for d in sf} == {0}  # Self-Forcing: fresh noise at 0
    assert len({d.exit_steps for d in sf}) > 2 and all(len(set(d.exit_steps)) == 1 for d in sf)  # one step, random


def test_dmd_options_are_checked():
    assert (
        get_recipe("wan2.1-1.3b").extended.grad_step == "last" and get_recipe("toy").self_forcing.grad_step == "uniform"
    )
    for bad in ({"grad_step": "first"}, {"noise_init": "zeros"}, {"window_sampling": "gauss"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DMDConfig(**bad)


def test_grpo_log_probability_sums_over_dimensions():
    """eq. 7 sums log N over the latent dimensions, so a policy shift of the mean moves the log-ratio by O(D) and
    the ratio leaves [1 - eps, 1 + eps]: clipping acts."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 16, 3, 8, 8, generator=g)
    sample = mean + 0.5 * torch.randn(mean.shape, generator=g)
    lp = R.gaussian_logp(sample, mean, 0.5)
    dims = mean[0].numel()
    expected = torch.distributions.Normal(mean, 0.5).log_prob(sample).flatten(1).sum(1)
    torch.testing.assert_close(lp, expected)
    ratio = torch.exp(R.gaussian_logp(sample, mean + 0.01, 0.5) - lp)
    assert dims > 3000 and ((ratio < 0.8) | (ratio > 1.2)).any()


@pytest.mark.parametrize("schedule", [{}, CORRELATED])
def test_grpo_replay_scores_the_rollouts_actions(schedule):
    """GRPO's replay under the unchanged policy gives the rollout's log-probabilities (ratio 1), and they are those
    of the noise actually drawn: each frame's own part, unit Gaussian, scaled by sigma (by sigma sqrt(1 - rho) where
    the stream's shared draw, fixed for the rollout, carries the rest)."""
    model, cache, schedule = _student(**schedule)
    fresh = _fresh_cache(model, cache)
    with torch.no_grad():
        record = R.policy_rollout(model, cache, SHAPE, 9, schedule, torch.Generator().manual_seed(2))
        for chunk in record:
            torch.testing.assert_close(R.replay_logp(model, fresh, chunk, schedule), chunk["logp"], rtol=1e-5, atol=0.1)
            R.replay_context(model, fresh, chunk, schedule)
    dims, rho = math.prod(SHAPE[1:]), schedule.frame_correlation
    for step, sigma in enumerate(schedule.sigmas[1:], start=1):
        std = sigma * math.sqrt(1 - rho) if rho and step >= schedule.correlated_from else sigma
        expected = -dims * (0.5 + math.log(std) + 0.5 * math.log(2 * math.pi))  # E[log N(x; mean, std)] over D dims
        logp = torch.stack([chunk["logp"][:, step - 1] for chunk in record])  # [chunks, B]
        assert abs(float(logp.mean()) - expected) < 0.02 * dims


def _fresh_cache(model, like):
    cache = RingKVCache(model.cfg, batch_size=like.batch_size, frame_tokens=like.frame_tokens, window=like.window)
    cache.set_text([(k.clone(), v.clone()) for k, v in like.text_kv])
    return cache


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Teacher and ODE stages of the smoke recipe, run once, uninterrupted."""
    out = tmp_path_factory.mktemp("smoke")
    recipe = get_recipe("smoke")
    histories = {name: run_stage(name, recipe, out, Dist()) for name in ("teacher", "ode", "dmd")}
    return recipe, out, histories


def test_ode_regression_sees_the_context_inference_gives(smoke_run, monkeypatch):
    """Each sample of the ODE regression is one chunk at a state of its teacher trajectory with every frame before it
    clean at t = 0: the layout whose block-causal forward equals inference over the cache
    (`test_pipeline.test_generation_equals_cache_free_loop`)."""
    recipe, out, _ = smoke_run
    stage = ODEStage(recipe, out, Dist())
    student, seen = stage.models["student"], []
    forward = student.forward
    monkeypatch.setattr(student, "forward", lambda x, t, ctx, **kw: seen.append((x, t)) or forward(x, t, ctx, **kw))
    for step in range(6):
        stage.step(step)
    data, fpc = stage.trajectories[0], recipe.frames_per_chunk  # one micro-batch: its virtual rank's share
    student_t = [1000 * s for s in stage.schedule.sigmas]
    samples = [(x[b], t[b]) for x, t in seen for b in range(x.shape[0])]
    assert any(float(t[0]) == 0 for _, t in samples), "no sample had a context before its chunk"
    for x, t in samples:
        noisy = (t > 0).nonzero().flatten()
        assert len(noisy) == fpc and noisy[0] % fpc == 0 and torch.equal(noisy, noisy[0] + torch.arange(fpc))
        step = min(range(4), key=lambda k: abs(student_t[k] - float(t[noisy[0]])))
        assert torch.allclose(t[noisy], torch.full((fpc,), student_t[step]))
        chunk, before = slice(int(noisy[0]), int(noisy[-1]) + 1), slice(0, int(noisy[0]))
        assert any(  # the clean context and the noisy chunk come from the same trajectory
            torch.equal(x[:, before], data["x0"][i, :, before])
            and torch.equal(x[:, chunk], data["states"][i, step, :, chunk])
            for i in range(len(data["prompts"]))
        )


def test_resume_gives_the_same_losses(smoke_run, tmp_path):
    recipe, out, histories = smoke_run
    for stage_cls, name in ((TeacherStage, "teacher"), (DMDStage, "dmd")):
        resumed = tmp_path / "resumed"
        if name == "dmd":  # the DMD stage starts from the teacher and ODE outputs of the uninterrupted run
            for dep in ("teacher", "ode"):
                shutil.copytree(out / dep, resumed / dep, dirs_exist_ok=True)
        first = stage_cls(recipe, resumed, Dist()).run(stop_after=2)  # "crash" after 2 steps (checkpointed)
        assert len(first) == 2
        again = stage_cls(recipe, resumed, Dist()).run()  # a new process picks up from the checkpoint
        assert again == histories[name], name


def test_budget_runs_resume_the_shorter_budget_and_equal_one_long_run(smoke_run, tmp_path):
    """train.budget's 2x student, trained on from its 1x checkpoint, is the one an uninterrupted 2x run trains (the
    DMD learning rate is constant); a checkpoint past the recipe's steps is refused."""
    from train import budget

    recipe, out, _ = smoke_run
    for dep in ("teacher", "ode"):
        shutil.copytree(out / dep, tmp_path / "run" / dep)
    students = budget.train_budgets(recipe, tmp_path / "run", (1, 2), Dist())
    longer = replace(recipe, extended=replace(recipe.extended, steps=2 * recipe.extended.steps))
    for dep in ("teacher", "ode"):
        shutil.copytree(out / dep, tmp_path / "long" / dep)
    history = run_stage("extended", longer, tmp_path / "long", Dist())
    budget_2x = json.loads((students[2].parent / "metrics.json").read_text())["history"]
    assert budget_2x == history and len(history) == 2 * recipe.extended.steps * recipe.extended.critic_per_gen
    ema = load_file(students[2])
    assert all(torch.equal(ema[k], v) for k, v in load_file(tmp_path / "long/extended/final/ema.safetensors").items())
    assert not torch.equal(ema["head.head.weight"], load_file(students[1])["head.head.weight"])
    with pytest.raises(CheckpointError, match="different recipe"):  # 2x's checkpoint, resumed by the 1x recipe
        ExtendedDMDStage(recipe, tmp_path / "run" / "budget", Dist()).run()
    budget.main(["--recipe", "smoke", "--out", str(tmp_path / "run"), "--budgets", "1,2", "--prompts", "2",
                 "--seeds", "1"])  # trains nothing more; the curve of both budgets (no dmd stage: no Self-Forcing row)
    rows = (tmp_path / "run/budget/eval/budget.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {budget.label(recipe, b)}" for b in (1, 2)]
    assert (tmp_path / "run/budget/eval/budget.png").stat().st_size > 0


def test_checkpoint_survives_a_crash_mid_save(tmp_path, monkeypatch):
    env = Dist()
    weights = {"m": {"w": torch.arange(4.0)}}
    save_checkpoint(tmp_path, 1, weights, {"step": 1}, env)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"m": {"w": torch.zeros(4)}}, {"step": 2}, env)
    loaded, state = load_checkpoint(tmp_path, ["m"])
    assert state["step"] == 1 and torch.equal(loaded["m"]["w"], torch.arange(4.0))


def test_corrupt_or_foreign_checkpoint_gives_clear_errors(smoke_run, tmp_path):
    recipe, out, _ = smoke_run
    shutil.copytree(out / "teacher" / "ckpt", tmp_path / "teacher" / "ckpt")
    latest = (tmp_path / "teacher" / "ckpt" / "LATEST").read_text()
    weights = tmp_path / "teacher" / "ckpt" / latest / "teacher.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="could not read checkpoint .*teacher.safetensors"):
        TeacherStage(recipe, tmp_path, Dist()).run()
    weights.write_bytes(good)
    other = replace(recipe, seed=recipe.seed + 1)
    with pytest.raises(CheckpointError, match="different recipe"):
        TeacherStage(other, tmp_path, Dist()).run()
    bigger = replace(recipe, model=replace(recipe.model, dim=64))
    with pytest.raises(CheckpointError):
        TeacherStage(bigger, tmp_path, Dist()).resume()
    # A checkpoint from before a recipe field existed resumes as that field's default, and only as it.
    state_file = tmp_path / "teacher" / "ckpt" / latest / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["recipe"].pop("codec_whitening") == 1.0
    torch.save(state, state_file)
    assert TeacherStage(recipe, tmp_path, Dist()).resume() == state["step"]
    with pytest.raises(CheckpointError, match="different recipe"):
        TeacherStage(replace(recipe, codec_whitening=0.0), tmp_path, Dist()).resume()


def test_unknown_recipe_and_stage():
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("pretrain", get_recipe("smoke"), Path("/nonexistent"), Dist())


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_two_process_training_keeps_ranks_identical(tmp_path):
    """torchrun, 2 CPU processes (gloo, FSDP2 with one unit per block + the root, activation checkpointing, bf16
    through the MixedPrecisionPolicy): every stage of the smoke recipe, whose windows start at different frames and
    restart at different steps from step to step (so a different number of forward passes each step), then eval on
    rank 0; `all` ships nothing (the shipped models and the README are byte-identical afterwards), and `ship --to`
    packages a student where it is told. One process accumulating 2 micro-batches (virtual ranks 0 and 1, the same
    policy over a group of one) trains what the 2 processes trained: the same teacher and ODE losses up to the fp32
    order of the gradient reduction (rel 1e-3; measured: 4e-4), and resumed mid-stage it equals itself
    uninterrupted."""
    from test_ship import tree_digest

    from train.ship import README, SHIPPED_MODELS

    before = {**tree_digest(SHIPPED_MODELS["default"].parent), **tree_digest(README)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = ["--recipe", "smoke", "--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "train", "all",
           *run, "--device", "cpu", "--dtype", "bfloat16"]  # fmt: skip
    # A rank that drew a different window would hang in a per-block all-gather: the timeout makes that a failure.
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {**tree_digest(SHIPPED_MODELS["default"].parent), **tree_digest(README)} == before

    for stage in ("teacher", "ode", "dmd", "extended", "grpo"):
        metrics = json.loads((tmp_path / "run" / stage / "final" / "metrics.json").read_text())
        sums, own = metrics["rank_checksums"], metrics["rank_fingerprints"]
        assert len(sums) == 2 and sums[0] == sums[1], stage
        assert len(own) == 2 and own[0] == own[1], stage  # each rank's own draws, hashed before any collective
    one = replace(get_recipe("smoke"), dtype="bfloat16", accumulate=2)
    TeacherStage(one, tmp_path / "resumed", Dist()).run(stop_after=2)  # "crash" after the step-2 checkpoint
    for stage in ("teacher", "ode"):
        history = run_stage(stage, one, tmp_path / "one", Dist())
        if stage == "teacher":
            assert run_stage(stage, one, tmp_path / "resumed", Dist()) == history
        torchrun = json.loads((tmp_path / "run" / stage / "final" / "metrics.json").read_text())["history"]
        assert len(history) == len(torchrun), stage
        for ours, theirs in zip(history, torchrun, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-3), stage
    assert (tmp_path / "run" / "eval" / "table.md").is_file()
    assert (tmp_path / "run" / "eval" / "dynamic.png").is_file()
    refused = subprocess.run([sys.executable, "-m", "train", "ship", *run], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "come from the 'toy' recipe" in refused.stderr, refused.stderr[-2000:]
    shipped = subprocess.run([sys.executable, "-m", "train", "ship", *run, "--to", str(tmp_path / "model")], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert {**tree_digest(SHIPPED_MODELS["default"].parent), **tree_digest(README)} == before
    from sfpp import Pipeline

    video = Pipeline.from_pretrained(tmp_path / "model")("a big red circle", num_frames=7, seed=0, progress=False)
    assert video.frames.shape == (1, 7, 32, 32, 3)


def _with_teacher_and_ode(out, to):
    for dep in ("teacher", "ode"):
        shutil.copytree(out / dep, to / dep, dirs_exist_ok=True)
    return to


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_blocks_give_identical_gradients(every):
    """Activation checkpointing of every `every`-th block recomputes the same fp32 forward in the backward: the
    gradients are bit-identical to the unchecked model's, and the checkpointed blocks did run twice."""
    from conftest import randomize_

    cfg = replace(get_recipe("smoke").model, num_layers=3)
    model = randomize_(WanModel(cfg), scale=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 8, 8, generator=g)
    t = 1000 * torch.rand(2, 6, generator=g)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    weight = torch.randn(2, 16, 6, 8, 8, generator=g)
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop early: no post hook
    grads = {}
    for k in (0, every):
        model.checkpoint_blocks = k
        model.zero_grad(set_to_none=True)
        calls.clear()
        (model(x, t, ctx, frames_per_chunk=3, window=6) * weight).sum().backward()
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert len(calls) == 3 + (len(range(0, 3, k)) if k else 0)  # a checkpointed block's forward runs again
    for n, grad in grads[0].items():
        assert torch.equal(grads[every][n], grad), n


def test_accumulating_four_micro_batches_of_two_is_one_batch_of_eight(smoke_run, tmp_path):
    """accumulate=4 with micro-batches of 2 (virtual ranks 0-3, each with its own data and random stream) gives the
    gradient of one batch of 8 made of the same samples: equal up to fp32 summation order (rtol 1e-5)."""
    recipe, out, _ = smoke_run
    shutil.copytree(out / "teacher", tmp_path / "teacher")
    acc = replace(recipe, accumulate=4)
    assert acc.ode.batch_size == 2
    stage = ODEStage(acc, tmp_path, Dist())
    stage.step(0)  # the gradients stay in .grad after the optimizer step (zeroed at the next step's start)
    ours = {n: p.grad.clone() for n, p in stage.models["student"].named_parameters()}
    ref = ODEStage(acc, tmp_path, Dist())  # the same weights, trajectories (cached on disk) and random streams
    batches = [ref.regression_batch(ref.trajectories[k]) for k in ref.micro_batches()]
    assert not torch.equal(batches[0][0], batches[1][0])  # each micro-batch has its virtual rank's samples
    whole = [torch.cat(parts) for parts in zip(*batches, strict=True)]
    assert whole[0].shape[0] == 8
    ref.regression_loss(*whole).backward()
    for n, p in ref.models["student"].named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_bf16_tracks_fp32_and_steps_the_fp32_master_weights(smoke_run, tmp_path):
    """dtype bfloat16 (FSDP2's MixedPrecisionPolicy over a group of one): the first three DMD steps' losses stay
    within 5% of fp32's (bf16 keeps 8 mantissa bits; measured: under 2%) without equalling them, the real score is
    held in bf16, and the sharded parameters stay fp32 master weights that take updates too small for bf16."""
    recipe, out, histories = smoke_run
    run = _with_teacher_and_ode(out, tmp_path)
    stage = DMDStage(replace(recipe, dtype="bfloat16"), run, Dist())
    assert stage.teacher.dtype == torch.bfloat16
    gen = stage.models["generator"]
    before = {n: p.to_local().detach().clone() for n, p in gen.named_parameters()}
    history = stage.run(stop_after=3)  # generator updates at steps 0 and 2, critic updates at every step
    reference = histories["dmd"][:3]
    assert history != reference  # computed in bf16
    for ours, theirs in zip(history, reference, strict=True):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=0.05), key
    tiny = 0
    for n, p in gen.named_parameters():
        master = p.to_local().detach()
        assert master.dtype == torch.float32, n
        tiny += int(((master != before[n]) & (master.bfloat16() == before[n].bfloat16())).sum())
    assert tiny > 0  # updates a bf16 copy of the weights would have lost


def test_the_recipe_sinks_reach_the_training_cache(smoke_run, tmp_path):
    """Recipe.sink: Self-Forcing++'s rollouts run through a cache with those sinks beside the recipe's window (as the
    shipped settings then say, tests/test_ship.py); an explicit layout still wins."""
    recipe, out, _ = smoke_run
    run = _with_teacher_and_ode(out, tmp_path)
    stage = ExtendedDMDStage(replace(recipe, window=3, sink=2), run, Dist())
    gen = stage.models["generator"]
    ctx = stage.encode(stage.text, ["a red circle"])
    cache, _ = stage.new_cache(gen, 1, ctx, stage.rollout_model("generator"))
    assert (cache.window, cache.sink) == (3, 2)
    cache, _ = stage.new_cache(gen, 1, ctx, stage.rollout_model("generator"), layout=(4, 0))
    assert (cache.window, cache.sink) == (4, 0)


def test_a_run_is_evaluated_with_the_cache_it_ships_with(smoke_run, tmp_path, monkeypatch):
    """Recipe.inference_cache: a run's students are evaluated through the cache `ship` writes into their settings
    (tests/test_ship.py), not the one they were trained through."""
    from train.evaluate import evaluate
    from train.stages import Stage

    recipe, out, _ = smoke_run
    (tmp_path / "teacher").symlink_to(out / "teacher")  # the run's text encoder
    seen, new_cache = [], Stage.new_cache
    monkeypatch.setattr(Stage, "new_cache", lambda self, *a: seen.append(a[5]) or new_cache(self, *a))
    weights = {"Self-Forcing": out / "dmd" / "final" / "ema.safetensors"}
    evaluate(replace(recipe, inference_cache=(4, 2)), tmp_path, torch.device("cpu"), 1, (1,), (0,), weights=weights)
    assert seen == [(4, 2)]
    evaluate(recipe, tmp_path, torch.device("cpu"), 1, (1,), (0,), weights=weights)
    assert seen[1] == (recipe.window, recipe.sink)


def test_lora_trains_only_adapters_and_the_merge_is_the_adapted_rollout(smoke_run, tmp_path):
    """lora_rank 4: only the adapters train (the base weights are bit-identical after two generator updates); the
    merged plain state dict (what the stage writes) rolls out the adapted model's video up to fp32 rounding (1e-4),
    and that video is not the base model's."""
    from train.common import full_state_dict

    recipe, out, _ = smoke_run
    run = _with_teacher_and_ode(out, tmp_path)
    lora = replace(recipe, lora_rank=4, self_forcing=replace(recipe.self_forcing, gen_lr=1e-2))  # visibly moves
    torch.manual_seed(0)
    stage = DMDStage(lora, run, Dist())
    gen = stage.models["generator"]
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    stage.run(stop_after=3)
    trained = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    changed = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_B." in n for n in changed) and changed <= trained
    optimized = {id(p) for group in stage.optimizers["generator"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in gen.parameters() if p.requires_grad}

    merged = WanModel(recipe.model)
    merged.load_state_dict(stage.plain(full_state_dict(gen), gen))  # strict: a plain WanModel
    base = WanModel(recipe.model)
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in before.items() if ".lora_" not in k})
    ctx = stage.encode(stage.text, ["a big red circle", "a small blue square"])
    videos = []
    for model in (gen, merged, base):
        cache = RingKVCache(model.cfg, batch_size=2, frame_tokens=16, window=recipe.window)
        with torch.no_grad():
            cache.set_text(model.text_kv(ctx))
        videos.append(R.student_rollout(model, cache, SHAPE, 12, stage.schedule, torch.Generator().manual_seed(5)))
    adapted, plain, original = videos
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-4)
    assert float((original - adapted).abs().max()) > 100 * float((plain - adapted).abs().max())


def test_teacher_curve_measures_every_checkpoint_once(smoke_run, tmp_path):
    """`python -m train.teacher_curve` samples each teacher checkpoint and the final teacher against the world; a
    second call adds only what is new, and a run without a teacher stage is a one-line error."""
    from train import teacher_curve

    recipe, out, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out / "teacher", run / "teacher")
    args = ["--recipe", "smoke", "--out", str(run), "--prompts", "2", "--seeds", "1", "--guidance", "1,2"]
    teacher_curve.main(args)
    rows = json.loads((run / "teacher" / "curve.json").read_text())["rows"]
    steps = sorted(teacher_curve.checkpoints(run))
    assert steps == [2, 4] and [(r["step"], r["guidance"]) for r in rows] == [(s, g) for s in steps for g in (1.0, 2.0)]
    for row in rows:
        assert np.isfinite(row["pixel_change/world@1x"][0]) and row["pixel_change/world@1x"][0] > 0
        assert 0 <= row["presence@1x"][0] <= 1 and 0 <= row["clipped@1x"][0] <= 1
    teacher_curve.main([*args[:-1], "2,3"])  # guidance 2 is there already: only 3 is sampled
    again = json.loads((run / "teacher" / "curve.json").read_text())["rows"]
    assert len(again) == 6 and again[:2] == rows[:2]
    with pytest.raises(SystemExit) as refused:
        teacher_curve.main(["--recipe", "smoke", "--out", str(tmp_path / "nothing")])
    assert refused.value.code == 2
