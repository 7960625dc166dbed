"""Self-Forcing++'s budget curve (the paper's Fig. 6): the `extended` stage trained to 1x, 4x and 8x its recipe's
generator updates, each student rolled out to 60x the teacher horizon and measured as `python -m train eval` measures,
beside the run's Self-Forcing student.

python -m train.budget --recipe toy --out runs/toy --budgets 1,4,8

Needs the run's teacher and ode stages (and dmd for the Self-Forcing row). Trains in <out>/budget/, whose teacher and
ode are links to the run's: the run's own `extended` checkpoints seed it, and each budget resumes from the one before
(the learning rate is constant, so the 4x run's step at 1x is the 1x run). Interrupted, it resumes from its last
checkpoint. Each budget's outputs go to <out>/budget/<b>x/; the evaluation to <out>/budget/eval/ (results.json,
table.md, one PNG per metric)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from train.common import Dist
from train.config import RECIPES, Recipe
from train.evaluate import MULTIPLES, evaluate
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
    evaluate(recipe, out / "budget", device, args.prompts, MULTIPLES, tuple(range(args.seeds)), weights=weights)


if __name__ == "__main__":
    main()
