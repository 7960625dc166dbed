"""The long-horizon gate of the fp8 KV cache: roll a model out far past its horizon with its KV cache in fp8 and in
the DiT's dtype, from the same prompts and noise, and compare window by window what 8-bit attention is known to
break in autoregressive video (over-saturation, drifting exposure, flicker): luminance, clipped channels, pixel
change (flicker) and colour drift from the first window, measured as `train.evaluate` measures them.

    python -m train.fp8_horizon --out train/results/toy/fp8_horizon         # the shipped model, 60x its horizon

The gate passes when in every band of windows (the first; up to 5x, 20x, 60x) up to `--multiple` x the horizon the
fp8 rollout's mean luminance and pixel change are within `--margin` (relative) of the reference rollout's and its
clipped share within `--clip-margin` (absolute), or, where the reference itself varies more, no further from it than
the reference rollout from another noise seed is (the noise floor: past the horizon any change, fp8 or another seed,
gives another video, and these are means over `--prompts` videos). On a CPU the kernels are torch's (fp8 storage,
dequantized for the math); on a GPU the pipeline's default kernels (the fp8 ring-attention kernel), so the
campaign's run gates what a GPU would pick. Writes results.json and table.md into --out; exits 1 when the gate
fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sfpp.pipeline import Pipeline
from train.config import RECIPES
from train.metrics import colour_drift, window_metrics
from train.world import eval_specs

GATED = ("luminance", "pixel_change", "clipped")  # what the gate bounds; colour drift is reported beside them


def rollout_windows(pipe: Pipeline, prompts: list[str], frames: int, horizon: int, seed: int) -> dict[str, list]:
    """Per `horizon`-frame window, the mean over prompts of the gated metrics and of the colour drift from each
    video's first window."""
    video = pipe(prompts, num_frames=frames, seed=seed, progress=False).frames.numpy()  # [B, T, H, W, 3]
    windows = video.shape[1] // horizon
    out: dict[str, list] = {m: [] for m in (*GATED, "colour_drift")}
    for w in range(windows):
        part = video[:, w * horizon : (w + 1) * horizon]
        per_video = [window_metrics(v) for v in part]
        for m in GATED:
            out[m].append(float(np.mean([p[m] for p in per_video])))
        out["colour_drift"].append(float(np.mean([colour_drift(v, v0) for v, v0 in zip(part, video[:, :horizon],
                                                                                       strict=True)])))  # fmt: skip
    return out


def bands(windows: int) -> list[tuple[int, int]]:
    """Window ranges [start, end) compared as a whole: the first window, then up to 5x, 20x, 60x and the last (one
    window's mean over a few videos is noisy; a band's is less so, and drift shows as a band moving)."""
    edges = sorted({1, *(x for x in (5, 20, 60) if x < windows), windows})
    return [(0, 1), *zip(edges[:-1], edges[1:], strict=True)] if windows > 1 else [(0, 1)]


def deviation(reference: dict[str, list], other: dict[str, list]) -> dict[str, float]:
    """The largest deviation of each gated metric over the bands of windows: relative for luminance and pixel
    change, absolute for the clipped share."""
    worst = {}
    for m in GATED:
        ref, got = np.array(reference[m]), np.array(other[m])
        diffs = []
        for a, b in bands(len(ref)):
            r, g = ref[a:b].mean(), got[a:b].mean()
            diffs.append(abs(g - r) if m == "clipped" else abs(g - r) / max(r, 1e-9))
        worst[m] = float(max(diffs))
    return worst


def gate(reference: dict, fp8: dict, other_seed: dict, margin: float, clip_margin: float) -> dict:
    """fp8's deviation and the noise floor's per gated metric, and whether fp8 is within max(margin, floor)."""
    got, floor = deviation(reference, fp8), deviation(reference, other_seed)  # per band of windows
    result: dict = {"fp8": got, "noise_floor": floor}
    for m in GATED:
        result[f"{m}_ok"] = got[m] <= max(clip_margin if m == "clipped" else margin, floor[m])
    result["passed"] = all(result[f"{m}_ok"] for m in GATED)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.fp8_horizon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes only into --out.",
    )  # fmt: skip
    p.add_argument("--model", default="default", help="a model directory or shipped name (default: the shipped one)")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=8, help="prompts of evaluation seed 0 (default: 8)")
    p.add_argument("--horizon", type=int, default=RECIPES["toy"].horizon,
                   help="the teacher's horizon in frames (default: the toy recipe's)")  # fmt: skip
    p.add_argument("--multiple", type=int, default=60, help="roll out to this many horizons (default: 60)")
    p.add_argument("--margin", type=float, default=0.05, help="relative bound on luminance and pixel change")
    p.add_argument("--clip-margin", type=float, default=0.005, help="absolute bound on the clipped share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if min(args.prompts, args.horizon, args.multiple) < 1 or args.margin <= 0 or args.clip_margin < 0:
        p.error("--prompts, --horizon and --multiple must be positive, the margins positive")
    torch.set_num_threads(1) if args.device == "cpu" else None
    prompts = [s.prompt() for s in eval_specs(0, args.prompts)]
    frames = args.horizon * args.multiple
    rows = {}
    for name, kv, seed in (("reference", None, 0), ("fp8", torch.float8_e4m3fn, 0), ("reference, seed 1", None, 1)):
        pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=torch.bfloat16, memory="full",
                                        **({"kv_dtype": kv} if kv is not None else {}))  # fmt: skip
        rows[name] = rollout_windows(pipe, prompts, frames, args.horizon, seed=seed)
    result = gate(rows["reference"], rows["fp8"], rows["reference, seed 1"], args.margin, args.clip_margin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "device": args.device, "dtype": "bfloat16", "prompts": args.prompts,
            "horizon": args.horizon, "multiple": args.multiple, "margin": args.margin,
            "clip_margin": args.clip_margin,
            "command": " ".join(["python -m train.fp8_horizon", *(sys.argv[1:] if argv is None else argv)]),
            }  # fmt: skip
    (out / "results.json").write_text(json.dumps({**meta, "gate": result, "windows": rows}, indent=2) + "\n")
    (out / "table.md").write_text(table(rows, result, args))
    print(table(rows, result, args))
    return 0 if result["passed"] else 1


def table(rows: dict, result: dict, args: argparse.Namespace) -> str:
    marks = sorted({1, *(x for x in (5, 20, 60) if x <= args.multiple), args.multiple})
    head = ["KV cache", *(f"{m} @{x}x" for m in (*GATED, "colour_drift") for x in marks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{r[m][x - 1]:.4f}" for m in (*GATED, "colour_drift") for x in marks]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    verdict = "passed" if result["passed"] else "FAILED"
    worst = ", ".join(f"{m} {result['fp8'][m]:.4f} (noise floor {result['noise_floor'][m]:.4f})" for m in GATED)
    return "\n".join(lines) + f"\n\nGate {verdict}: largest deviation from the reference over the bands up to " \
        f"{args.multiple}x: {worst}; bounds: {args.margin:g} relative ({args.clip_margin:g} absolute for clipped), " \
        "or the noise floor.\n"


if __name__ == "__main__":
    sys.exit(main())
