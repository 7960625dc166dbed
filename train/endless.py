"""Past the RoPE table: roll the shipped toy model out to 3x its 1024 latent frames, with and without sink frames,
and measure exposure and motion window by window against the first window, and the time of every chunk.

    python -m train.endless --out train/results/toy/endless      # about an hour on one CPU thread

Writes results.json, table.md and plots (luminance, dynamic degree, ms per chunk) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sfpp.pipeline import Pipeline
from train.metrics import window_metrics
from train.world import eval_specs

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "sfpp" / "assets" / "default"


def rollout(pipe: Pipeline, prompts: list[str], latent_frames: int, horizon: int, seed: int) -> dict:
    """Per `horizon`-frame window: luminance and dynamic degree averaged over the prompts; ms of every chunk."""
    stream = pipe.stream(prompts, num_frames=latent_frames, seed=seed, progress=False)
    buffer, windows, chunk_ms, rebase_chunks = [], {"luminance": [], "dynamic": []}, [], []
    while True:
        shift = stream.cache.shift_done
        start = time.perf_counter()
        try:
            frames = next(stream)
        except StopIteration:
            break
        chunk_ms.append((time.perf_counter() - start) * 1000)
        if stream.cache.shift_done != shift:
            rebase_chunks.append(len(chunk_ms) - 1)
        buffer.append(frames.numpy())
        video = np.concatenate(buffer, axis=1)
        while video.shape[1] >= horizon:
            per_prompt = [window_metrics(v[:horizon]) for v in video]
            for key in windows:
                windows[key].append(float(np.mean([m[key] for m in per_prompt])))
            video = video[:, horizon:]
        buffer = [video]
    return {"per_window": windows, "chunk_ms": chunk_ms, "rebase_chunks": rebase_chunks}


def rebase_cost(pipe: Pipeline, prompt: str, repeats: int = 50) -> dict:
    """Median ms of a chunk (batch 1, window full) and of the re-base itself (`rotate_window_keys`, done once per
    `rope_max_positions - sink - window` frames), and the bytes a re-base moves for this model and for Wan2.1-1.3B
    at 832x480 in bf16 (computed)."""
    from sfpp.models.dit import get_config

    stream = pipe.stream(prompt, seed=0, progress=False)
    chunk_ms, rotate_ms = [], []
    for _ in range(8):
        next(stream)
    for _ in range(repeats):
        start = time.perf_counter()
        next(stream)
        chunk_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        stream.cache.rotate_window_keys(0)
        rotate_ms.append((time.perf_counter() - start) * 1000)
    stream.close()

    def rebase_bytes(cfg, window_tokens: int, element: int) -> int:  # read + write of the keys' temporal dims
        return 2 * cfg.num_layers * window_tokens * cfg.num_heads * cfg.rope_split[0] * element

    s, cfg = pipe.settings, pipe.transformer.cfg
    tokens = (s.height // pipe.decoder.spatial_factor // cfg.patch_size[1]) ** 2  # square toy frames
    wan = get_config("wan2.1-1.3b")
    return {
        "chunk_ms_median": float(np.median(chunk_ms)),
        "rebase_ms_median": float(np.median(rotate_ms)),
        "chunks_between_rebases": (cfg.rope_max_positions - s.sink - s.window) // s.frames_per_chunk,
        "rebase_bytes": rebase_bytes(cfg, s.window * tokens, 4),
        "rebase_bytes_wan_1.3b_832x480_bf16": rebase_bytes(wan, 21 * 1560, 2),
    }


def summary(result: dict, limit: int, horizon: int) -> dict:
    lum, dyn = (np.array(result["per_window"][k]) for k in ("luminance", "dynamic"))
    past = slice(limit // horizon, None)  # windows after the RoPE table's end
    ms = np.array(result["chunk_ms"])
    rebases = result["rebase_chunks"]
    steady = np.delete(ms[5:], [c - 5 for c in rebases if c >= 5])
    thirds = np.array_split(steady, 3)
    settled = slice(5, limit // horizon)  # before the limit, after the first 5 windows (the model settles there)
    return {
        "luminance_mean_rel_dev_past_limit": float(lum[past].mean() / lum[0] - 1),
        "luminance_mean_rel_dev_before_limit": float(lum[settled].mean() / lum[0] - 1),
        "dynamic_mean_ratio_past_limit": float(dyn[past].mean() / dyn[0]),
        "dynamic_mean_ratio_before_limit": float(dyn[settled].mean() / dyn[0]),
        "luminance_first": float(lum[0]),
        "luminance_max_rel_dev_past_limit": float(np.abs(lum[past] / lum[0] - 1).max()),
        "luminance_rel_dev_last": float(lum[-1] / lum[0] - 1),
        "dynamic_first": float(dyn[0]),
        "dynamic_min_ratio_past_limit": float((dyn[past] / dyn[0]).min()),
        "dynamic_max_ratio_past_limit": float((dyn[past] / dyn[0]).max()),
        "dynamic_ratio_last": float(dyn[-1] / dyn[0]),
        "chunk_ms_median_by_third": [float(np.median(t)) for t in thirds],
        "rebase_chunk_ms": [float(ms[c]) for c in rebases],
        "rebase_chunks": rebases,
    }


def plots(results: dict, horizon: int, limit: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label in (("luminance", "mean luminance"), ("dynamic", "dynamic degree (px/frame)")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, r in results.items():
            values = np.array(r["per_window"][metric])
            x = (np.arange(len(values)) + 0.5) * horizon
            ax.plot(x, values, label=name, linewidth=0.8)
            band = (0.95, 1.05) if metric == "luminance" else (0.8, 1.2)
            ax.axhspan(values[0] * band[0], values[0] * band[1], alpha=0.08, color=ax.lines[-1].get_color())
        for k in range(1, int(x[-1] // limit) + 1):
            ax.axvline(k * limit, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("latent frame (dotted: multiples of the 1024-frame RoPE table)")
        ax.set_ylabel(label)
        ax.set_title(f"{metric} per {horizon}-frame window (band: criterion around the first window)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"endless_{metric}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in results.items():
        ax.plot(r["chunk_ms"], label=name, linewidth=0.5)
        ax.scatter(r["rebase_chunks"], [r["chunk_ms"][c] for c in r["rebase_chunks"]], s=12, marker="x")
    ax.set_xlabel("chunk (x: chunks that re-based positions)")
    ax.set_ylabel("ms per chunk (1 CPU thread, shared machine)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "endless_chunk_ms.png", dpi=100)
    plt.close(fig)


def table(summaries: dict, limit: int) -> str:
    head = [
        "run", "luminance @1st window", f"lum/first - 1 before {limit} (windows 5.., absolute positions)",
        f"lum/first - 1 past {limit}: mean (max abs)", f"dynamic/first before {limit} (windows 5..)",
        f"dynamic/first past {limit}: mean (min..max)", "ms/chunk median by third (shared CPU)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [
            name,
            f"{s['luminance_first']:.3f}",
            f"{100 * s['luminance_mean_rel_dev_before_limit']:+.1f}%",
            f"{100 * s['luminance_mean_rel_dev_past_limit']:+.1f}% "
            f"({100 * s['luminance_max_rel_dev_past_limit']:.1f}%)",
            f"{s['dynamic_mean_ratio_before_limit']:.2f}",
            f"{s['dynamic_mean_ratio_past_limit']:.2f} ({s['dynamic_min_ratio_past_limit']:.2f}.."
            f"{s['dynamic_max_ratio_past_limit']:.2f})",
            " / ".join(f"{m:.0f}" for m in s["chunk_ms_median_by_third"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cost_line(cost: dict) -> str:
    return (
        f"\nRe-base cost (batch 1, one CPU thread): {cost['rebase_ms_median']:.2f} ms once every "
        f"{cost['chunks_between_rebases']} chunks, against {cost['chunk_ms_median']:.0f} ms per chunk; it moves "
        f"{cost['rebase_bytes'] / 2**10:.0f} KiB here and {cost['rebase_bytes_wan_1.3b_832x480_bf16'] / 2**30:.2f} "
        f"GiB for Wan2.1-1.3B at 832x480 in bf16 (computed).\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument(
        "--out", required=True, help="folder for the results (the committed ones: train/results/toy/endless)"
    )
    parser.add_argument("--latent-frames", type=int, default=3 * 1024 + 36)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--rope-limit", type=int, help="pretend the RoPE table is this short (quick checks)")
    parser.add_argument(
        "--cost-only", action="store_true", help="time a chunk and a re-base; table and plots of the saved rollouts"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(args.model)
    if args.rope_limit:
        pipe.transformer.cfg = replace(pipe.transformer.cfg, rope_max_positions=args.rope_limit)
    horizon, limit = pipe.settings.window, pipe.transformer.cfg.rope_max_positions
    prompts = [s.prompt() for s in eval_specs(0, args.prompts)]  # train/evaluate.py's first seed
    base = pipe.settings
    if args.cost_only:
        cost = rebase_cost(pipe, prompts[0])
        print(json.dumps(cost))
        saved = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        if "runs" in saved:
            saved["summary"] = {name: summary(r, limit, horizon) for name, r in saved["runs"].items()}
        (out / "results.json").write_text(json.dumps({**saved, "rebase_cost": cost}, indent=1))
        if "summary" in saved:
            (out / "table.md").write_text(table(saved["summary"], limit) + cost_line(cost))
            plots(saved["runs"], horizon, limit, out)
        return
    results, summaries = {}, {}
    for sink in args.sinks:
        pipe.settings = replace(base, sink=sink)
        name = f"window {base.window}, {sink} sink frames"
        results[name] = rollout(pipe, prompts, args.latent_frames, horizon, seed=1)
        summaries[name] = summary(results[name], limit, horizon)
        print(name, json.dumps(summaries[name]), flush=True)
        meta = {"latent_frames": args.latent_frames, "horizon": horizon, "rope_limit": limit, "prompts": prompts}
        (out / "results.json").write_text(json.dumps({**meta, "summary": summaries, "runs": results}, indent=1))
    (out / "table.md").write_text(table(summaries, limit))
    plots(results, horizon, limit, out)
    print(table(summaries, limit))


if __name__ == "__main__":
    main()
