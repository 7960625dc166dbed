"""Long-horizon evaluation: roll each model out to 1x, 5x and 20x the teacher horizon, over several evaluation seeds
(each its own prompts and noise), and measure window by window exposure, motion, flicker, chunk seams, clipping and
fidelity to the world's ground truth. Writes results.json, table.md and one PNG per metric into <out>/eval/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sfpp.models.dit import WanModel
from train import rollout as R
from train.common import Dist
from train.config import Recipe
from train.metrics import no_repeat, window_metrics
from train.stages import Stage, load_module
from train.world import WorldSpec, eval_specs, frames_uint8, render

STUDENTS = {  # label -> weights
    "Self-Forcing": ("dmd", "ema"),
    "Self-Forcing++": ("extended", "ema"),
    "Self-Forcing++ +GRPO": ("grpo", "policy"),
}
WORLD, TEACHER = "world (ground truth)", "teacher"
METRICS = ("luminance", "clipped", "dynamic", "flicker", "fidelity", "seam")
EVAL_SEEDS = (0, 1, 2)


class _Eval(Stage):
    """Borrows a stage's helpers (codec, text, cache) without training anything."""

    name = "eval"

    def setup(self) -> None:
        self.text = self.frozen_text()


@torch.no_grad()
def evaluate(
    recipe: Recipe,
    out: Path,
    device: torch.device,
    num_prompts: int = 16,
    multiples: tuple[int, ...] = (1, 5, 20),
    seeds: tuple[int, ...] = EVAL_SEEDS,
) -> dict:
    helper = _Eval(recipe, out, Dist(device=device))
    k, fpc = recipe.horizon, recipe.frames_per_chunk
    teacher = helper.frozen_teacher()
    students = {}
    for label, (stage, file) in STUDENTS.items():
        path = out / stage / "final" / f"{file}.safetensors"
        if path.is_file():
            students[label] = load_module(WanModel(recipe.model), path).to(device).eval()

    per_seed: dict[str, list[dict]] = {}
    rollouts: dict[str, R.RolloutModel] = {}  # per student: as inference runs it, in the recipe's compute dtype
    for seed in seeds:
        specs = eval_specs(seed, num_prompts)
        ctx = helper.encode(helper.text, [s.prompt() for s in specs])
        world = torch.stack([render(s, k * max(multiples), recipe.frame_size) for s in specs])
        videos = {WORLD: frames_uint8(world).numpy()}
        noise = R.randn((num_prompts, recipe.model.in_channels, k, *recipe.latent_hw), _gen(seed), device)
        uncond = helper.encode(helper.text, [recipe.negative_prompt] * num_prompts)
        x0, _ = R.teacher_ode(
            teacher, noise, ctx, uncond, guidance=recipe.ode.guidance, steps=recipe.ode.euler_steps,
            shift=helper.schedule.shift,
        )  # fmt: skip
        videos[TEACHER] = helper.codec.decode_frames(x0).cpu().numpy()
        for label, student in students.items():
            rollout = rollouts.setdefault(label, R.RolloutModel(student, helper.dtype, device, (0, None)))
            cache, runner = helper.new_cache(rollout.get(), num_prompts, ctx, rollout)  # the chunk runner
            shape = helper.chunk_shape(num_prompts)
            latents = R.student_rollout(
                rollout.get(), cache, shape, k * max(multiples), helper.schedule, _gen(seed), runner=runner
            )
            videos[label] = helper.codec.decode_frames(latents).cpu().numpy()
        for label, video in videos.items():
            per_seed.setdefault(label, []).append(video_metrics(video, specs, k, fpc))

    results = {label: summarise(runs, per_seed[WORLD], multiples) for label, runs in per_seed.items()}
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    meta = {"horizon": k, "fps": recipe.fps, "seeds": list(seeds), "prompts_per_seed": num_prompts}
    (eval_dir / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    (eval_dir / "table.md").write_text(table(results, multiples))
    plots(results, k, recipe.fps, eval_dir)
    print(table(results, multiples))
    return results


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1 + seed)


def video_metrics(videos: np.ndarray, specs: list[WorldSpec], horizon: int, frames_per_chunk: int) -> dict:
    """Metrics of one seed's videos [B, T, H, W, 3]: per window (mean over prompts), and per rollout the relative
    luminance change between its last window and its first."""
    windows = videos.shape[1] // horizon
    per_video = [
        [window_metrics(v[w * horizon : (w + 1) * horizon], spec, frames_per_chunk) for w in range(windows)]
        for v, spec in zip(videos, specs, strict=True)
    ]
    per_window = {m: [float(np.mean([pv[w][m] for pv in per_video])) for w in range(windows)] for m in METRICS}
    drift = [abs(pv[-1]["luminance"] - pv[0]["luminance"]) / max(pv[0]["luminance"], 1e-9) for pv in per_video]
    return {
        "windows": windows,
        "per_window": per_window,
        "rollout_drift": drift if windows > 1 else None,
        "no_repeat": float(np.mean([no_repeat(v, horizon) for v in videos])) if windows > 1 else None,
    }


def summarise(runs: list[dict], world: list[dict], multiples: tuple[int, ...]) -> dict:
    """Mean and spread over seeds. `motion_vs_world`: per window, the model's dynamic degree over the world's on the
    same prompts; its lowest and highest window. Drift: median and worst over every rollout of every seed."""
    windows = runs[0]["windows"]

    def spread(values: list[float]) -> list[float]:
        return [float(np.mean(values)), float(np.std(values))]

    s: dict[str, list[float] | None] = {}
    for m in ("fidelity", "luminance", "dynamic"):
        for x in multiples:
            s[f"{m}@{x}x"] = spread([r["per_window"][m][x - 1] for r in runs]) if x <= windows else None
    ratios = [np.array(r["per_window"]["dynamic"]) / np.array(w["per_window"]["dynamic"][:windows]) for r, w in
              zip(runs, world, strict=True)]  # fmt: skip
    s["motion_vs_world_min"] = spread([float(r.min()) for r in ratios])
    s["motion_vs_world_max"] = spread([float(r.max()) for r in ratios])
    s["seam"] = spread([float(np.mean(r["per_window"]["seam"])) for r in runs])
    last = min(max(multiples), windows)
    s["clipped@last"] = spread([r["per_window"]["clipped"][last - 1] for r in runs])
    s["flicker@last"] = spread([r["per_window"]["flicker"][last - 1] for r in runs])
    if windows > 1:
        s["dynamic_last/first"] = spread([r["per_window"]["dynamic"][-1] / r["per_window"]["dynamic"][0] for r in runs])
        s["drift_median"] = spread([float(np.median(r["rollout_drift"])) for r in runs])
        all_drift = [d for r in runs for d in r["rollout_drift"]]
        s["drift_median_all"] = [float(np.median(all_drift)), 0.0]
        s["drift_worst"] = [float(np.max(all_drift)), 0.0]
        s["no_repeat"] = spread([r["no_repeat"] for r in runs])
    by_seed = {m: np.array([r["per_window"][m] for r in runs]) for m in METRICS}  # [seeds, windows]
    return {
        "windows": windows,
        "summary": s,
        "per_window": {m: v.mean(0).tolist() for m, v in by_seed.items()},
        "per_window_min": {m: v.min(0).tolist() for m, v in by_seed.items()},
        "per_window_max": {m: v.max(0).tolist() for m, v in by_seed.items()},
        "per_seed": runs,
    }


def _fmt(v: list[float] | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v[0]:.1f}% ± {100 * v[1]:.1f}" if v[1] else f"{100 * v[0]:.1f}%"
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def table(results: dict, multiples: tuple[int, ...] = (1, 5, 20)) -> str:
    """Markdown, every figure the mean ± standard deviation over the evaluation seeds."""
    last = max(multiples)
    head = ["model"] + [f"fidelity @{x}x" for x in multiples]
    head += ["motion / world (lowest window)", "motion / world (highest window)", "chunk seam",
             f"clipped channels @{last}x", f"luminance drift per rollout @{last}x: median (worst)",
             f"dynamic {last}x / 1x", f"flicker @{last}x", "NoRepeat"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        s = r["summary"]
        long = r["windows"] >= last
        drift = "-"
        if long and "drift_worst" in s:
            drift = f"{_fmt(s['drift_median'], True)} ({100 * s['drift_worst'][0]:.1f}%)"
        row = [label] + [_fmt(s[f"fidelity@{x}x"]) for x in multiples]
        row += [_fmt(s["motion_vs_world_min"]), _fmt(s["motion_vs_world_max"]), _fmt(s["seam"])]
        row += [_fmt(s["clipped@last"], True) if long else "-", drift]
        row += [_fmt(s.get("dynamic_last/first")), _fmt(s["flicker@last"]) if long else "-", _fmt(s.get("no_repeat"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict, horizon: int, fps: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, r in results.items():
            values = r["per_window"][metric]
            seconds = [(i + 0.5) * horizon / fps for i in range(len(values))]
            (line,) = ax.plot(seconds, values, marker="o" if len(values) == 1 else None, label=label)
            if len(values) > 1:
                ax.fill_between(seconds, r["per_window_min"][metric], r["per_window_max"][metric],
                                color=line.get_color(), alpha=0.15)  # fmt: skip
        ax.set_xlabel("time (s)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per {horizon}-frame window (band: lowest..highest seed)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=100)
        plt.close(fig)
