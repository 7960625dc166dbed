"""Steering the shipped toy model, measured against the toy world: how fast a prompt switch takes hold with and
without KV re-cache, what a re-cache costs, and what continuing the world's own clips keeps across the seam.

    python -m train.steering --out train/results/toy/steering      # a few minutes on one CPU thread

Writes results.json, table.md and plots into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sfpp.pipeline import Pipeline
from train.world import BACKGROUNDS, COLOURS, eval_specs, frames_uint8, render

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "sfpp" / "assets" / "default"


def chroma_axis(a: tuple[float, float, float], b: tuple[float, float, float]) -> np.ndarray:
    """The direction from colour a to colour b in chromaticity (rgb / (r + g + b))."""
    return np.array(b) / sum(b) - np.array(a) / sum(a)


def along(frames: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """[B, n, H, W, 3] -> [B]: each video's mean chromaticity along `axis`."""
    mean = frames.reshape(frames.shape[0], -1, 3).astype(np.float64).mean(1)
    return (mean / mean.sum(1, keepdims=True)) @ axis


def switch_curves(pipe: Pipeline, first: str, then: str, axis: np.ndarray, batch: int, before: int, after: int):
    """Per chunk after the switch: how far the colour has moved from where `first` keeps it to where `then` keeps it
    (same noise), averaged over `batch` videos; with and without re-cache."""

    def run(prompt: str, new: str | None = None, recache: bool = True) -> np.ndarray:
        stream = pipe.stream([prompt] * batch, seed=1, progress=False, recache=recache)
        scores = []
        for i in range(before + after):
            if i == before and new is not None:
                stream.set_prompt(new)
            scores.append(along(next(stream).numpy(), axis))
        stream.close()
        return np.stack(scores[before:])  # [after, B]

    lo, hi = run(first), run(then)
    gap = (hi - lo).mean(1)
    return {
        label: ((run(first, then, recache) - lo).mean(1) / gap).tolist()
        for label, recache in (("re-cache", True), ("no re-cache", False))
    }


def recache_cost(pipe: Pipeline, prompt: str, repeats: int = 20) -> dict:
    """Median ms of a chunk, of its context pass alone, and of a switch with and without re-cache (batch 1); and
    the model forward passes each makes."""
    stream = pipe.stream(prompt, seed=0, progress=False)
    for _ in range(8):  # fill the window
        next(stream)
    model, calls = pipe.transformer, [0]
    run = model._run

    def counted(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)

    model._run = counted
    times: dict[str, list[float]] = {"chunk": [], "switch + re-cache": [], "switch, no re-cache": []}
    passes: dict[str, int] = {}
    try:
        for i in range(repeats):
            for label in times:
                recache = label == "switch + re-cache"
                before, start = calls[0], time.perf_counter()
                if label == "chunk":
                    next(stream)
                else:
                    stream._switch([prompt if i % 2 else prompt + " again"], recache)
                times[label].append((time.perf_counter() - start) * 1000)
                passes[label] = calls[0] - before
    finally:
        model._run = run
        stream.close()
    frames = len(stream._visible_frames(stream.cache.frames_done))
    return {
        "median_ms": {k: float(np.median(v)) for k, v in times.items()},
        "forward_passes": passes,
        "recache_frames": frames,
        "chunk_frames": pipe.settings.frames_per_chunk,
    }


def continuation(pipe: Pipeline, videos: int, given: int, new: int) -> dict:
    """Continue the world's clips (first object of each of `videos` evaluation prompts): per frame around the seam,
    the object's colour contrast at its true position (relative to the world's own contrast) and the distance
    from its true centre to the centroid of its colour; the same for a stream of the same prompt without the
    clip (control). Frames given..given+new are generated."""
    specs = eval_specs(0, videos)
    prompts = [s.prompt() for s in specs]
    world = frames_uint8(torch.stack([render(s, given + new, 32) for s in specs]))  # [B, T, H, W, 3]
    cont = pipe(prompts, video=world[:, :given], num_frames=new, seed=2, progress=False).frames.numpy()
    ctrl = pipe(prompts, num_frames=given + new, seed=2, progress=False).frames.numpy()
    frames = np.arange(given - 4, given + new)
    out = {"frames": frames.tolist(), "given": given}
    side = 32
    ys, xs = np.mgrid[:side, :side]
    for label, video in (("continuation", cont), ("no given frames", ctrl), ("world", world.numpy())):
        contrast, error = [], []
        for spec, v in zip(specs, video, strict=True):
            obj = spec.objects[0]
            centres = obj.positions(torch.from_numpy(frames)).numpy() * side - 0.5
            c = np.array(COLOURS[obj.colour], np.float32)
            c = (c - c.mean()) / np.linalg.norm(c - c.mean())
            x = v[frames].astype(np.float32) / 255
            chroma = (x - x.mean(-1, keepdims=True)) @ c
            inside = np.stack([np.hypot(xs - cx, ys - cy) < obj.radius * side for cx, cy in centres])
            contrast.append([ch[m].mean() - ch[~m].mean() for ch, m in zip(chroma, inside, strict=True)])
            w = np.clip(chroma, 0, None) ** 2 + 1e-12
            cen = np.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], -1) / w.sum((1, 2))[:, None]
            error.append(np.linalg.norm(cen - centres, axis=-1))
        out[label] = {"contrast": np.mean(contrast, 0).tolist(), "centroid_error_px": np.median(error, 0).tolist()}
    world_contrast = np.array(out["world"]["contrast"])
    for label in ("continuation", "no given frames", "world"):
        out[label]["contrast_vs_world"] = (np.array(out[label]["contrast"]) / world_contrast).tolist()
    # frame-to-frame change: across the seam vs between generated frames
    diff = np.abs(np.diff(cont.astype(np.float32), axis=1)).mean((0, 2, 3, 4))
    out["seam_change"] = float(diff[given - 1])
    out["generated_change"] = float(diff[given:].mean())
    out["given_change"] = float(diff[: given - 1].mean())
    # continuing the model's own video (decoded, re-encoded) against the stream that made it
    again = pipe(prompts, video=ctrl[:, :given], num_frames=new, seed=5, progress=False).frames.numpy()
    own_diff, again_diff = (np.abs(np.diff(v.astype(np.float32), axis=1)).mean((0, 2, 3, 4)) for v in (ctrl, again))
    fpc = pipe.settings.frames_per_chunk  # toy codec: one latent frame per video frame
    out["own_video"] = {
        "seam_change": float(again_diff[given - 1]),
        "chunk_boundary_change": float(own_diff[given - 1 :: fpc].mean()),  # the stream's own chunk seams
        "inside_chunk_change": float(np.delete(own_diff[given - 1 :], np.s_[::fpc]).mean()),
    }
    return out


def plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, curves) in zip(axes, result["switch"].items(), strict=True):
        for label, values in curves.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("chunk after the switch")
        ax.set_ylabel("fraction of the way to the new prompt")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "switch.png", dpi=100)
    plt.close(fig)
    c = result["continuation"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in ("world", "continuation", "no given frames"):
        axes[0].plot(c["frames"], c[label]["contrast_vs_world"], marker=".", label=label)
        axes[1].plot(c["frames"], c[label]["centroid_error_px"], marker=".", label=label)
    for ax, ylabel in zip(axes, ("object colour at its true place / world's", "centroid error (px)"), strict=True):
        ax.axvline(c["given"] - 0.5, color="grey", linestyle=":")
        ax.set_xlabel("frame (dotted: the seam)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "continue.png", dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| switch | re-cache | fraction of the way after 1 / 2 / 3 / 6 chunks |", "|---|---|---|"]
    for name, curves in result["switch"].items():
        for label, v in curves.items():
            lines.append(f"| {name} | {label} | {v[0]:.2f} / {v[1]:.2f} / {v[2]:.2f} / {v[5]:.2f} |")
    cost = result["recache_cost"]
    ms, passes = cost["median_ms"], cost["forward_passes"]
    lines += [
        "",
        f"Re-cache cost (batch 1, {cost['recache_frames']} cached frames re-encoded; a chunk is "
        f"{cost['chunk_frames']} frames): " + ", ".join(f"{k} {ms[k]:.1f} ms ({passes[k]} passes)" for k in ms),
    ]
    c = result["continuation"]
    k = c["frames"].index(c["given"])
    lines += [
        "",
        "| continuing the world's clips | object colour at its true place / world's (last given, 1st, 2nd, 3rd new)"
        " | centroid error px (same frames) |",
        "|---|---|---|",
    ]
    for label in ("world", "continuation", "no given frames"):
        r = c[label]
        contrast = " / ".join(f"{x:.2f}" for x in r["contrast_vs_world"][k - 1 : k + 3])
        error = " / ".join(f"{x:.1f}" for x in r["centroid_error_px"][k - 1 : k + 3])
        lines.append(f"| {label} | {contrast} | {error} |")
    own = c["own_video"]
    lines.append(
        f"\nFrame-to-frame change (mean abs, 0..255): the world's clips {c['given_change']:.1f}, across their seam "
        f"{c['seam_change']:.1f}, generated frames after it {c['generated_change']:.1f}. Continuing the model's own "
        f"video instead: across the seam {own['seam_change']:.1f}, where the stream that made it changes by "
        f"{own['chunk_boundary_change']:.1f} across its own chunk boundaries and {own['inside_chunk_change']:.1f} "
        f"inside chunks."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument(
        "--out", required=True, help="folder for the results (the committed ones: train/results/toy/steering)"
    )
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(args.model)
    red = "a big red circle moving slowly over a plain grey background"
    result = {
        "switch": {
            "object: red -> blue circle": switch_curves(
                pipe, red, red.replace("red", "blue"), chroma_axis(COLOURS["red"], COLOURS["blue"]), args.batch, 8, 8
            ),
            "background: grey -> teal": switch_curves(
                pipe, red, red.replace("grey", "teal"), chroma_axis(BACKGROUNDS["grey"], BACKGROUNDS["teal"]),
                args.batch, 8, 8,
            ),  # fmt: skip
        },
        "recache_cost": recache_cost(pipe, red),
        "continuation": continuation(pipe, args.batch, given=24, new=12),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(result))
    plots(result, out)
    print(table(result))


if __name__ == "__main__":
    main()
