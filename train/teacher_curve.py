"""The teacher's samples while it trains: every checkpoint of a run's teacher stage (its EMA weights, as the stage
ships them) samples the evaluation prompts with the ODE the students are distilled from (Euler, CFG), and each
sample is measured one horizon long against the world's own clip of the same prompt, as `train.evaluate` measures
the students: pixel change (flicker) and object speed over the world's, objects present as one blob, blobs per
object, clipped channels, fidelity, chunk seams. Issue 20 asks for a good teacher before any distillation: this is
where to see whether it is one.

python -m train.teacher_curve --recipe toy --out runs/toy --guidance 1,2,3          # the checkpoints there now
python -m train.teacher_curve --recipe toy --out runs/toy --watch                    # ... and each new one

Writes <out>/teacher/curve.json (one row per step and guidance; rows already there are kept)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sfpp.models.dit import WanModel
from sfpp.models.text import ByteTextEncoder
from train.config import RECIPES, Recipe
from train.evaluate import EVAL_SEEDS, summarise, teacher_video, video_metrics
from train.stages import load_module, world_codec
from train.world import eval_specs, frames_uint8, render


def checkpoints(out: Path) -> dict[int, Path]:
    """Teacher checkpoints of a run by step: ckpt/step_N folders, and final/ (as the step it ended at)."""
    found = {int(p.name.removeprefix("step_")): p for p in (out / "teacher" / "ckpt").glob("step_*") if p.is_dir()}
    final = out / "teacher" / "final"
    if (final / "DONE").is_file():
        steps = len(json.loads((final / "metrics.json").read_text())["history"])
        found[steps] = final
    return found


def load_teacher(recipe: Recipe, folder: Path) -> tuple[WanModel, ByteTextEncoder]:
    """The EMA teacher and its text encoder, from a checkpoint folder (ema.safetensors) or final/."""
    weights = folder / ("ema.safetensors" if (folder / "ema.safetensors").is_file() else "teacher.safetensors")
    teacher = load_module(WanModel(recipe.model), weights)
    return teacher.eval(), load_module(ByteTextEncoder(recipe.text), folder / "text.safetensors").eval()


class Reference:
    """What every measurement shares: the codec, and per evaluation seed its prompts and the world's metrics."""

    def __init__(self, recipe: Recipe, prompts: int, seeds: tuple[int, ...]) -> None:
        self.recipe, self.codec = recipe, world_codec(recipe)
        k, fpc = recipe.horizon, recipe.frames_per_chunk
        self.seeds = {}
        for seed in seeds:
            specs = eval_specs(seed, prompts)
            world = frames_uint8(torch.stack([render(s, k, recipe.frame_size) for s in specs])).numpy()
            self.seeds[seed] = (specs, video_metrics(world, specs, k, fpc))

    @torch.no_grad()
    def measure(self, teacher: WanModel, text: ByteTextEncoder, guidance: float) -> dict[str, list[float]]:
        """`train.evaluate`'s summary at 1x: [mean, std] over the evaluation seeds of each metric (relative ones
        over the world's on the same prompts)."""
        recipe, runs = self.recipe, []
        for seed, (specs, _) in self.seeds.items():
            ctx = text(text.tokenize([s.prompt() for s in specs]))
            uncond = text(text.tokenize([recipe.negative_prompt] * len(specs)))
            video = teacher_video(recipe, teacher, self.codec, ctx, uncond, seed, guidance)
            runs.append(video_metrics(video, specs, recipe.horizon, recipe.frames_per_chunk))
        return summarise(runs, [world for _, world in self.seeds.values()], (1,))["summary"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m train.teacher_curve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default="toy", choices=sorted(r for r, v in RECIPES.items() if not v.wan))
    p.add_argument("--out", required=True, help="the run directory whose teacher stage is measured")
    p.add_argument("--guidance", default="2", help="CFG scales to sample at, comma-separated (default: 2)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per evaluation seed (default: 16)")
    p.add_argument("--seeds", type=int, default=len(EVAL_SEEDS), help="evaluation seeds (default: 3)")
    p.add_argument("--watch", action="store_true", help="keep measuring new checkpoints until the stage is done")
    args = p.parse_args(argv)
    try:
        guidance = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        p.error(f"--guidance takes numbers separated by commas, got {args.guidance!r}")
    if args.prompts < 1 or args.seeds < 1:
        p.error("--prompts and --seeds must be positive")
    recipe, out = RECIPES[args.recipe], Path(args.out)
    if not (out / "teacher").is_dir():
        p.error(f"{out / 'teacher'} does not exist: run `python -m train teacher --recipe {args.recipe} --out {out}`")
    torch.set_num_threads(1)
    path = out / "teacher" / "curve.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    reference = Reference(recipe, args.prompts, tuple(range(args.seeds)))
    while True:
        finished = (out / "teacher" / "final" / "DONE").is_file()  # read before the pass: the final one is measured
        done = {(r["step"], r["guidance"]) for r in rows}
        for step, folder in sorted(checkpoints(out).items()):
            todo = [g for g in guidance if (step, g) not in done]
            if not todo:
                continue
            try:
                teacher, text = load_teacher(recipe, folder)
            except FileNotFoundError:  # pruned by the training run while we read it: the next one comes
                continue
            for g in todo:
                row = {"step": step, "guidance": g, **reference.measure(teacher, text, g)}
                rows.append(row)
                print(json.dumps({k: v if not isinstance(v, list) else round(v[0], 3) for k, v in row.items()}),
                      flush=True)  # fmt: skip
                meta = {"recipe": args.recipe, "prompts_per_seed": args.prompts, "seeds": args.seeds,
                        "euler_steps": recipe.ode.euler_steps, "shift": recipe.shift, "horizon": recipe.horizon,
                        "values": "train.evaluate's summary at 1x: [mean, std over seeds]"}  # fmt: skip
                path.write_text(json.dumps({**meta, "rows": sorted(rows, key=lambda r: (r["step"], r["guidance"]))},
                                           indent=1))  # fmt: skip
        if not args.watch or finished:
            return
        time.sleep(30)


if __name__ == "__main__":
    main()
