"""Self-Forcing++'s budget curve (the paper's Fig. 6): the `extended` stage trained to 1x, 4x and 8x its recipe's
generator updates, each student rolled out to 60x the teacher horizon and measured as `python -m train eval` measures,
beside the run's Self-Forcing student.

python -m train.budget --recipe toy --out runs/toy --budgets 1,4,8

Needs the run's teacher and ode stages (and dmd for the Self-Forcing row). Trains in <out>/budget/, whose teacher and
ode are links to the run's: the run's own `extended` checkpoints seed it, and each budget resumes from the one before
(the learning rate is constant, so the 4x run's step at 1x is the 1x run). Interrupted, it resumes from its last
checkpoint. Each budget's outputs go to <out>/budget/<b>x/; the evaluation to <out>/budget/eval/ (results.json,
table.md, one PNG per metric, and the curve: budget.md, budget.png)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from train.common import Dist
from train.config import RECIPES, Recipe
from train.evaluate import MULTIPLES, evaluate, spread_text
from train.stages import run_stage


def label(recipe: Recipe, budget: int) -> str:
    return f"Self-Forcing++ {budget}x ({budget * recipe.extended.steps} updates)"


def train_budgets(recipe: Recipe, out: Path, budgets: tuple[int, ...], env: Dist) -> dict[int, Path]:
    """Train the `extended` stage to each budget in turn; return budget -> its EMA student's weights."""
    for stage in ("teacher", "ode"):
        if not (out / stage / "final" / "DONE").is_file():
            raise FileNotFoundError(f"{out / stage} is not finished: run `python -m train {stage} --out {out}` first")
    run = out / "budget"
    run.mkdir(parents=True, exist_ok=True)
    for stage in ("teacher", "ode"):
        if not (run / stage).exists():
            (run / stage).symlink_to(Path("..") / stage)
    ckpt, seed = run / "extended" / "ckpt", out / "extended" / "ckpt"
    if not ckpt.exists() and seed.is_dir():  # the run's own extended stage is the first steps of every budget
        shutil.copytree(seed, ckpt)
    students = {}
    for budget in budgets:
        done = run / f"{budget}x"
        if not (done / "DONE").is_file():
            longer = replace(recipe, extended=replace(recipe.extended, steps=budget * recipe.extended.steps))
            run_stage("extended", longer, run, env)
            shutil.rmtree(done, ignore_errors=True)
            (run / "extended" / "final").rename(done)  # the next budget resumes from the checkpoint, not from here
        students[budget] = done / "ema.safetensors"
    return students


CURVE = ("luminance/world", "clipped", "object_speed/world", "pixel_change/world", "presence", "fidelity")
AT = (20, 60)  # the multiples of the horizon the curve reports (the issue's)
PERCENT = ("clipped", "presence")


def curve(results: dict, recipe: Recipe, budgets: tuple[int, ...], out: Path) -> str:
    """budget.md (each metric at 20x and 60x by budget, Self-Forcing's row beside) and budget.png (the paper's Fig. 6:
    quality against generator updates, the band one standard deviation over the seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"Self-Forcing": results["Self-Forcing"]["summary"]} if "Self-Forcing" in results else {}
    rows.update({label(recipe, b): results[label(recipe, b)]["summary"] for b in budgets})
    head = ["model", *(f"{m} @{x}x" for m in CURVE for x in AT)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():
        cells = [spread_text(s.get(f"{m}@{x}x"), m in PERCENT) for m in CURVE for x in AT]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "budget.md").write_text(text)
    updates = [b * recipe.extended.steps for b in budgets]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, metric in zip(axes.flat, CURVE, strict=True):
        for x, colour in zip(AT, ("tab:blue", "tab:orange"), strict=True):
            key = f"{metric}@{x}x"
            mean, std = (np.array([rows[label(recipe, b)][key][i] for b in budgets]) for i in (0, 1))
            ax.plot(updates, mean, marker="o", color=colour, label=f"Self-Forcing++ @{x}x")
            ax.fill_between(updates, mean - std, mean + std, color=colour, alpha=0.15)
            if "Self-Forcing" in rows and rows["Self-Forcing"].get(key):
                ax.axhline(rows["Self-Forcing"][key][0], color=colour, linestyle="--", linewidth=0.8,
                           label=f"Self-Forcing @{x}x")  # fmt: skip
        ax.set_xlabel("extended generator updates")
        ax.set_title(metric, fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=100)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m train.budget", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default="toy", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="the run directory (its teacher, ode and extended stages)")
    p.add_argument("--budgets", default="1,4,8", help="multiples of the recipe's extended generator updates")
    p.add_argument("--prompts", type=int, default=16, help="prompts per evaluation seed (default: 16)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default: 3)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        budgets = tuple(int(b) for b in args.budgets.split(","))
    except ValueError:
        p.error(f"--budgets takes comma-separated integers, got {args.budgets!r}")
    if min(budgets) < 1 or list(budgets) != sorted(set(budgets)) or args.prompts < 1 or args.seeds < 1:
        p.error("--budgets must be increasing positive integers, --prompts and --seeds positive")
    recipe, out = RECIPES[args.recipe], Path(args.out)
    if recipe.wan:
        p.error("the budget curve runs on the toy world's recipes (its evaluation measures the toy world)")
    device = torch.device(args.device)
    try:
        students = train_budgets(recipe, out, budgets, Dist(device=device))
    except FileNotFoundError as exc:
        p.error(str(exc))
    if args.no_eval:
        return
    weights = {"Self-Forcing": out / "dmd" / "final" / "ema.safetensors"}
    weights.update({label(recipe, b): path for b, path in students.items()})
    seeds = tuple(range(args.seeds))
    results = evaluate(recipe, out / "budget", device, args.prompts, MULTIPLES, seeds, weights=weights)
    print(curve(results, recipe, budgets, out / "budget" / "eval"))


if __name__ == "__main__":
    main()
