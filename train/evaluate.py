"""Long-horizon evaluation: roll each model out to 1x, 5x, 20x and 60x the teacher horizon, over several seeds
(each its own prompts and noise), and measure window by window (a multiple is reported over the windows within 10%
of it), against the world's ground truth on the same prompts:
flicker (pixel change next to the objects' own motion), the prompted objects (present as one blob of their size, blobs
per object, speed), exposure, clipping, colour drift from the rollout's first window, chunk seams and fidelity.
Writes results.json, table.md and one PNG per metric into <out>/eval/.

`--shipped` evaluates the models that ship in sfpp/assets (`Pipeline.from_pretrained(name)`: the same weights a
toy run's stages wrote) instead of a run's stages; the teacher, which does not ship, is left out then. Each model
rolls out with its own cache (a shipped model's settings: window and attention sinks; a run's: the recipe's
`inference_layout`), unless `--window W --sink S` gives every student another."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from sfpp.models.dit import WanModel
from train import rollout as R
from train.common import Dist
from train.config import Recipe
from train.metrics import colour_drift, no_repeat, window_metrics
from train.stages import Stage, load_module
from train.world import WorldSpec, eval_specs, frames_uint8, render

STUDENTS = {  # label -> weights
    "Self-Forcing": ("dmd", "ema"),
    "Self-Forcing++": ("extended", "ema"),
    "Self-Forcing++ +GRPO": ("grpo", "policy"),
}
SHIPPED = {"Self-Forcing": "self-forcing", "Self-Forcing++": "default", "Self-Forcing++ +GRPO": "self-forcing++-grpo"}
WORLD, TEACHER = "world (ground truth)", "teacher"
METRICS = ("luminance", "clipped", "dynamic", "pixel_change", "presence", "blobs", "object_speed", "fidelity", "seam",
           "colour_drift")  # fmt: skip
RELATIVE = ("pixel_change", "object_speed", "luminance", "dynamic")  # reported over the world's on the same prompts
EVAL_SEEDS = (0, 1, 2)
MULTIPLES = (1, 5, 20, 60)  # horizons reported by default (issue 20 asks for 20x and 60x)


class _Eval(Stage):
    """Borrows a stage's helpers (codec, text, cache) without training anything."""

    name = "eval"

    def setup(self) -> None:
        self.text = self.frozen_text()


class _ShippedEval(_Eval):
    """The same, with the shipped models' text encoder (a run directory need not exist)."""

    def setup(self) -> None:
        from sfpp.pipeline import Pipeline

        self.text = Pipeline.from_pretrained(SHIPPED["Self-Forcing++"]).text_encoder.to(self.device).eval()


@torch.no_grad()
def evaluate(
    recipe: Recipe,
    out: Path,
    device: torch.device,
    num_prompts: int = 16,
    multiples: tuple[int, ...] = MULTIPLES,
    seeds: tuple[int, ...] = EVAL_SEEDS,
    shipped: bool = False,
    weights: dict[str, Path] | None = None,
    layout: tuple[int, int] | None = None,
) -> dict:
    """`weights` (label -> student weights) replaces the run's stages and leaves the teacher out (train.budget).
    `layout` (window, sink frames of the cache) replaces every student's own: a shipped model's settings, else the
    recipe's `inference_layout`."""
    helper = (_ShippedEval if shipped else _Eval)(recipe, out, Dist(device=device))
    k, fpc = recipe.horizon, recipe.frames_per_chunk
    students, teacher = {}, None
    schedules = {}  # label -> the schedule it samples with: a shipped model's own, else the recipe's
    layouts = {}  # label -> its cache's (window, sink): a shipped model's own, else the recipe's inference cache
    if shipped:
        from sfpp.pipeline import Pipeline

        for label, name in SHIPPED.items():
            pipe = Pipeline.from_pretrained(name)
            students[label], schedules[label] = pipe.transformer.float().to(device).eval(), pipe.schedule
            layouts[label] = (pipe.settings.window, pipe.settings.sink)
    else:
        if weights is None:  # the run's own stages, and its teacher
            teacher = helper.frozen_teacher()
            weights = {label: out / stage / "final" / f"{f}.safetensors" for label, (stage, f) in STUDENTS.items()}
        for label, path in weights.items():
            if path.is_file():
                students[label] = load_module(WanModel(recipe.model), path).to(device).eval()

    per_seed: dict[str, list[dict]] = {}
    rollouts: dict[str, R.RolloutModel] = {}  # per student: as inference runs it, in the recipe's compute dtype
    for seed in seeds:
        specs = eval_specs(seed, num_prompts)
        ctx = helper.encode(helper.text, [s.prompt() for s in specs])
        world = torch.stack([render(s, k * max(multiples), recipe.frame_size) for s in specs])
        videos = {WORLD: frames_uint8(world).numpy()}
        if teacher is not None:
            uncond = helper.encode(helper.text, [recipe.negative_prompt] * num_prompts)
            videos[TEACHER] = teacher_video(recipe, teacher, helper.codec, ctx, uncond, seed, recipe.ode.guidance)
        for label, student in students.items():
            rollout = rollouts.setdefault(label, R.RolloutModel(student, helper.dtype, device, (0, None)))
            schedule = schedules.get(label, helper.schedule)
            own = layouts.get(label, recipe.inference_layout)
            cache, runner = helper.new_cache(
                rollout.get(), num_prompts, ctx, rollout, schedule, layout or own
            )  # and the chunk runner bound to it
            shape = helper.chunk_shape(num_prompts)
            latents = R.student_rollout(
                rollout.get(), cache, shape, k * max(multiples), schedule, _gen(seed), runner=runner
            )
            videos[label] = helper.codec.decode_frames(latents).cpu().numpy()
        for label, video in videos.items():
            per_seed.setdefault(label, []).append(video_metrics(video, specs, k, fpc))

    results = {label: summarise(runs, per_seed[WORLD], multiples) for label, runs in per_seed.items()}
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    meta = {"horizon": k, "fps": recipe.fps, "seeds": list(seeds), "prompts_per_seed": num_prompts,
            "multiples": list(multiples), "models": "shipped (sfpp/assets)" if shipped else str(out),
            "cache": "each model's own" if layout is None else {"window": layout[0], "sink": layout[1]}}  # fmt: skip
    (eval_dir / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    (eval_dir / "table.md").write_text(table(results, multiples))
    plots(results, k, recipe.fps, eval_dir)
    print(table(results, multiples))
    return results


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1 + seed)


def teacher_video(
    recipe: Recipe, teacher: WanModel, codec, ctx: torch.Tensor, uncond: torch.Tensor, seed: int, guidance: float
) -> np.ndarray:
    """The teacher's one-horizon samples [B, T, H, W, 3] of an evaluation seed's prompts, by the ODE the students are
    distilled from (Euler steps and shift of the recipe, CFG `guidance`)."""
    shape = (ctx.shape[0], recipe.model.in_channels, recipe.horizon, *recipe.latent_hw)
    x0, _ = R.teacher_ode(
        teacher, R.randn(shape, _gen(seed), ctx.device), ctx, uncond, guidance=guidance,
        steps=recipe.ode.euler_steps, shift=recipe.shift,
    )  # fmt: skip
    return codec.decode_frames(x0).cpu().numpy()


def video_metrics(videos: np.ndarray, specs: list[WorldSpec], horizon: int, frames_per_chunk: int) -> dict:
    """Metrics of one seed's videos [B, T, H, W, 3]: per window (mean over prompts; `colour_drift` against each
    rollout's own first window), and per rollout the relative luminance change between its last window and its
    first."""
    windows = videos.shape[1] // horizon
    per_video = []
    for v, spec in zip(videos, specs, strict=True):
        parts = [v[w * horizon : (w + 1) * horizon] for w in range(windows)]
        per_video.append([{**window_metrics(p, spec, frames_per_chunk), "colour_drift": colour_drift(p, parts[0])}
                          for p in parts])  # fmt: skip
    per_window = {m: [_mean([pv[w][m] for pv in per_video]) for w in range(windows)] for m in METRICS}
    drift = [abs(pv[-1]["luminance"] - pv[0]["luminance"]) / max(pv[0]["luminance"], 1e-9) for pv in per_video]
    return {
        "windows": windows,
        "per_window": per_window,
        "rollout_drift": drift if windows > 1 else None,
        "no_repeat": float(np.mean([no_repeat(v, horizon) for v in videos])) if windows > 1 else None,
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]  # an object never seen twice has no speed
    return float(np.mean(finite)) if finite else float("nan")


def span(x: int, windows: int) -> range:
    """The window indices reported "at x times the horizon": every window within 10% of x (1x and 5x: their own
    window alone; 20x: windows 18..22), clipped to the rollout's `windows` (at its last multiple, the windows up
    to it). One window holds too few frames to judge a rollout by: an object lost and found again elsewhere reads as
    a jump, and one such jump moved a single window's object speed by half the world's."""
    return range((9 * x + 9) // 10 - 1, min(windows, 11 * x // 10))


def summarise(runs: list[dict], world: list[dict], multiples: tuple[int, ...]) -> dict:
    """Mean and spread over seeds, at each multiple of the horizon (over its `span` of windows):
    `<m>/world@<x>x` for the metrics measured against the world's on the same prompts (`RELATIVE`, the ratio of
    the two means over the span), `<m>@<x>x` for the others; chunk seams over every window; luminance drift per
    rollout: median and worst over every rollout of every seed."""
    windows = runs[0]["windows"]

    def spread(values: list[float]) -> list[float]:
        return [_mean(values), float(np.nanstd(values)) if any(map(math.isfinite, values)) else float("nan")]

    def at(run: dict, m: str, x: int) -> float:  # nan where no window of the span saw the object move
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanmean([run["per_window"][m][w] for w in span(x, windows)]))

    s: dict[str, list[float] | None] = {}
    for x in multiples:
        for m in METRICS:
            if m == "seam":
                continue
            if x > windows:
                s[f"{m}/world@{x}x" if m in RELATIVE else f"{m}@{x}x"] = None
            elif m in RELATIVE:
                ratios = [at(r, m, x) / max(at(v, m, x), 1e-9) for r, v in zip(runs, world, strict=True)]
                s[f"{m}/world@{x}x"] = spread(ratios)
            else:
                s[f"{m}@{x}x"] = spread([at(r, m, x) for r in runs])
    s["seam"] = spread([_mean(r["per_window"]["seam"]) for r in runs])
    if windows > 1:
        s["drift_median"] = spread([float(np.median(r["rollout_drift"])) for r in runs])
        all_drift = [d for r in runs for d in r["rollout_drift"]]
        s["drift_worst"] = [float(np.max(all_drift)), 0.0]
        s["no_repeat"] = spread([r["no_repeat"] for r in runs])
    by_seed = {m: np.array([r["per_window"][m] for r in runs]) for m in METRICS}  # [seeds, windows]
    with warnings.catch_warnings():  # a window where no seed saw an object move stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "windows": windows,
            "summary": s,
            "per_window": {m: np.nanmean(v, 0).tolist() for m, v in by_seed.items()},
            "per_window_min": {m: np.nanmin(v, 0).tolist() for m, v in by_seed.items()},
            "per_window_max": {m: np.nanmax(v, 0).tolist() for m, v in by_seed.items()},
            "per_seed": runs,
        }


def spread_text(v: list[float] | None, pct: bool = False) -> str:
    if v is None or not math.isfinite(v[0]):
        return "-"
    if pct:
        return f"{100 * v[0]:.1f}% ± {100 * v[1]:.1f}" if v[1] else f"{100 * v[0]:.1f}%"
    return f"{v[0]:.2f} ± {v[1]:.2f}"


# (column, summary key, as a percentage): `{x}` is the first or the last multiple.
COLUMNS = [
    ("pixel change / world @{x}x", "pixel_change/world@{x}x", False),
    ("object speed / world @{x}x", "object_speed/world@{x}x", False),
    ("objects present @{x}x", "presence@{x}x", True),
    ("blobs per object @{x}x", "blobs@{x}x", False),
    ("clipped channels @{x}x", "clipped@{x}x", True),
    ("luminance / world @{x}x", "luminance/world@{x}x", False),
    ("colour drift @{x}x", "colour_drift@{x}x", False),
    ("fidelity @{x}x", "fidelity@{x}x", False),
]


def table(results: dict, multiples: tuple[int, ...] = MULTIPLES) -> str:
    """Markdown, every figure the mean ± standard deviation over the evaluation seeds, at the first and the last
    multiple of the horizon."""
    ends = sorted({multiples[0], multiples[-1]})
    last = ends[-1]
    cols = [(c.format(x=x), k.format(x=x), pct) for c, k, pct in COLUMNS for x in ends if not (k.startswith("colour")
            and x == 1)]  # fmt: skip
    head = ["model", *(c for c, _, _ in cols), "chunk seam", f"luminance drift per rollout @{last}x: median (worst)",
            "NoRepeat"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        s = r["summary"]
        drift = "-"
        if r["windows"] >= last and "drift_worst" in s:
            drift = f"{spread_text(s['drift_median'], True)} ({100 * s['drift_worst'][0]:.1f}%)"
        row = [label, *(spread_text(s.get(k), pct) for _, k, pct in cols), spread_text(s["seam"]), drift,
               spread_text(s.get("no_repeat"))]  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    import argparse

    from train.config import RECIPES

    p = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes into <out>/eval/; with --shipped --ship-tables it also writes into the repository: the "
        "README's evaluation table and the shipped models' MODEL_CARD.md (sfpp/assets/*), from this evaluation.",
    )  # fmt: skip
    p.add_argument("--recipe", default="toy", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="the run directory (with --shipped: any folder for eval/)")
    p.add_argument("--shipped", action="store_true", help="the models in sfpp/assets instead of the run's stages")
    p.add_argument("--ship-tables", action="store_true", help="with --shipped: write the table into the README and "
                   "the shipped model cards (the weights are left as they are)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=16, help="prompts per evaluation seed (default: 16)")
    p.add_argument("--seeds", type=int, default=len(EVAL_SEEDS), help="evaluation seeds (default: 3)")
    default = ",".join(map(str, MULTIPLES))
    p.add_argument("--multiples", default=default, help=f"horizons to report, in teacher horizons ({default})")
    p.add_argument("--window", type=int, help="roll every student out with this many window frames in its cache "
                   "(default: its own: a shipped model's settings, else the recipe's inference cache)")  # fmt: skip
    p.add_argument("--sink", type=int, help="... and this many first frames kept as attention sinks (default: its own)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    multiples = tuple(int(x) for x in args.multiples.split(","))
    if args.prompts < 1 or args.seeds < 1 or min(multiples) < 1 or list(multiples) != sorted(set(multiples)):
        p.error("--prompts and --seeds must be positive, --multiples increasing positive integers")
    recipe = RECIPES[args.recipe]
    if args.shipped and recipe.wan:
        p.error("--shipped evaluates the toy world's shipped models: use --recipe toy")
    if args.ship_tables and not args.shipped:
        p.error("--ship-tables writes the evaluation of the shipped models: add --shipped")
    if (args.window is None) != (args.sink is None):
        p.error("--window and --sink go together")
    if args.ship_tables and args.window is not None:
        p.error("--ship-tables writes the shipped models' tables as they run: drop --window and --sink")
    if args.window is not None:
        from sfpp.pipeline import StreamSettings

        try:  # the engine's own rules for a cache: sinks not negative, a window that holds a chunk
            StreamSettings(frames_per_chunk=recipe.frames_per_chunk, window=args.window, sink=args.sink)
        except ValueError as e:
            p.error(f"--window {args.window} --sink {args.sink}: {e}")
    torch.set_num_threads(1)
    if args.ship_tables:
        from train.ship import check_shippable

        check_shippable(recipe)  # before the evaluation's minutes, not after
    layout = None if args.window is None else (args.window, args.sink)
    evaluate(recipe, Path(args.out), torch.device(args.device), args.prompts, multiples, tuple(range(args.seeds)),
             shipped=args.shipped, layout=layout)  # fmt: skip
    if args.ship_tables:
        from train.ship import restamp_tables

        restamp_tables(recipe, Path(args.out) / "eval")


if __name__ == "__main__":
    main()
