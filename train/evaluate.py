"""Long-horizon evaluation: roll each model out to 1x, 5x and 20x the teacher horizon and measure, window by window,
exposure, motion, flicker, repetition and fidelity to the world's ground truth. Writes results.json, table.md and
one PNG per metric into <out>/eval/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sfpp.model import WanModel
from train import rollout as R
from train.common import Dist
from train.config import Recipe
from train.metrics import no_repeat, window_metrics
from train.stages import Stage, load_module
from train.world import render, sample_spec

STUDENTS = {  # label -> weights
    "Self-Forcing": ("dmd", "ema"),
    "Self-Forcing++": ("extended", "ema"),
    "Self-Forcing++ +GRPO": ("grpo", "policy"),
}
METRICS = ("luminance", "clipped", "dynamic", "flicker", "fidelity")


class _Eval(Stage):
    """Borrows a stage's helpers (codec, text, cache) without training anything."""

    name = "eval"

    def setup(self) -> None:
        self.text = self.frozen_text()


@torch.no_grad()
def evaluate(recipe: Recipe, out: Path, device: torch.device, num_prompts: int = 16, multiples=(1, 5, 20)) -> dict:
    helper = _Eval(recipe, out, Dist(device=device))
    k = recipe.horizon
    seeds = [7_000_000 + i for i in range(num_prompts)]
    specs = [sample_spec(s) for s in seeds]
    prompts = [s.prompt() for s in specs]
    ctx = helper.encode(helper.text, prompts)
    videos: dict[str, np.ndarray] = {}

    # The world itself, and the teacher at its horizon (Euler + CFG from noise).
    videos["world (ground truth)"] = np.stack(
        [
            ((render(s, k * max(multiples), recipe.frame_size).permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
            for s in specs
        ]
    )
    teacher = helper.frozen_teacher()
    gen = torch.Generator().manual_seed(1)
    noise = R.randn((num_prompts, recipe.model.in_channels, k, *recipe.latent_hw), gen, device)
    x0, _ = R.teacher_ode(
        teacher,
        noise,
        ctx,
        helper.encode(helper.text, [""] * num_prompts),
        guidance=recipe.ode.guidance,
        steps=recipe.ode.euler_steps,
        shift=helper.schedule.shift,
    )
    videos["teacher"] = helper.codec.decode_frames(x0).cpu().numpy()

    for label, (stage, file) in STUDENTS.items():
        path = out / stage / "final" / f"{file}.safetensors"
        if not path.is_file():
            continue
        student = load_module(WanModel(recipe.model), path).to(device).eval()
        cache = helper.new_cache(student, num_prompts, ctx)
        gen = torch.Generator().manual_seed(1)
        latents = R.student_rollout(
            student, cache, helper.chunk_shape(num_prompts), k * max(multiples), helper.schedule, gen
        )
        videos[label] = helper.codec.decode_frames(latents).cpu().numpy()

    results = {}
    for label, video in videos.items():
        windows = video.shape[1] // k
        per_window = {m: [] for m in METRICS}
        for w in range(windows):
            ms = [window_metrics(v[w * k : (w + 1) * k], spec) for v, spec in zip(video, specs, strict=True)]
            for m in METRICS:
                per_window[m].append(float(np.mean([x[m] for x in ms])))
        results[label] = {
            "windows": windows,
            "per_window": per_window,
            "no_repeat": float(np.mean([no_repeat(v, k) for v in video])) if windows > 1 else None,
        }
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "results.json").write_text(json.dumps({"horizon": k, "fps": recipe.fps, "results": results}, indent=2))
    (eval_dir / "table.md").write_text(table(results, multiples))
    plots(results, k, recipe.fps, eval_dir)
    print(table(results, multiples))
    return results


def table(results: dict, multiples=(1, 5, 20)) -> str:
    """Markdown: each metric in the first window and at the end of 5x and 20x the horizon; plus the two ratios the
    paper's claim is about: dynamic degree and exposure at 20x relative to the first window."""
    head = ["model"] + [f"{m} @{x}x" for m in ("luminance", "dynamic", "fidelity") for x in multiples]
    head += ["clipped @20x", "flicker @20x", "dynamic 20x/1x", "|lum 20x - 1x|/1x", "NoRepeat"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        pw, n = r["per_window"], r["windows"]

        def at(metric: str, multiple: int, pw=pw, n=n) -> str:
            return f"{pw[metric][multiple - 1]:.3f}" if multiple <= n else "-"

        row = [label] + [at(m, x) for m in ("luminance", "dynamic", "fidelity") for x in multiples]
        last = multiples[-1]
        if last <= n:
            d = pw["dynamic"][last - 1] / max(pw["dynamic"][0], 1e-9)
            lum = abs(pw["luminance"][last - 1] - pw["luminance"][0]) / max(pw["luminance"][0], 1e-9)
            row += [at("clipped", last), at("flicker", last), f"{d:.2f}", f"{lum:.3f}", f"{r['no_repeat']:.2f}"]
        else:
            row += ["-"] * 5
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
            ax.plot(seconds, values, marker="o" if len(values) == 1 else None, label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per {horizon}-frame window")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=100)
        plt.close(fig)
