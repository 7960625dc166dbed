"""Package a trained student as an sfpp model directory (the shipped default model) with its model card."""

from __future__ import annotations

import json
from pathlib import Path

from sfpp.model import WanModel
from sfpp.pipeline import Pipeline, StreamSettings
from sfpp.sampler import FlowMatchSchedule
from sfpp.text import ByteTextEncoder
from train.config import Recipe
from train.stages import load_module, world_codec

ASSETS = Path(__file__).resolve().parent.parent / "sfpp" / "assets"
# Shipped model name (sfpp.pipeline.SHIPPED_MODELS) -> the stage whose student it is.
SHIPPED_STAGES = {"default": "extended", "self-forcing": "dmd", "self-forcing++-grpo": "grpo"}


def ship_all(recipe: Recipe, out: Path) -> None:
    """Every shipped model: the Self-Forcing++ student as the default, the Self-Forcing baseline and the GRPO
    student beside it, so anyone can re-run the comparison."""
    for name, stage in SHIPPED_STAGES.items():
        ship(recipe, out, ASSETS / name, stage)


def ship(recipe: Recipe, out: Path, to: Path | None = None, stage: str = "extended") -> Path:
    weights = {"grpo": "policy", "extended": "ema", "dmd": "ema"}[stage]
    to = to or ASSETS / "default"
    student = load_module(WanModel(recipe.model), out / stage / "final" / f"{weights}.safetensors")
    text = load_module(ByteTextEncoder(recipe.text), out / "teacher" / "final" / "text.safetensors")
    settings = StreamSettings(
        frames_per_chunk=recipe.frames_per_chunk,
        window=recipe.window,
        sink=0,
        height=recipe.frame_size,
        width=recipe.frame_size,
        fps=recipe.fps,
    )
    Pipeline(
        student, text, world_codec(recipe), schedule=FlowMatchSchedule(shift=recipe.shift), settings=settings
    ).save_pretrained(to)
    (to / "MODEL_CARD.md").write_text(model_card(recipe, out, stage))
    size = sum(f.stat().st_size for f in to.iterdir())
    print(f"shipped {out / stage} -> {to} ({size / 2**20:.1f} MiB)")
    return to


def model_card(recipe: Recipe, out: Path, stage: str) -> str:
    table = (out / "eval" / "table.md").read_text() if (out / "eval" / "table.md").is_file() else "(not evaluated)\n"
    histories = {}
    for name in ("teacher", "ode", "dmd", "extended", "grpo"):
        metrics = out / name / "final" / "metrics.json"
        if metrics.is_file():
            histories[name] = len(json.loads(metrics.read_text())["history"])
    steps = ", ".join(f"{k} {v} steps" for k, v in histories.items())
    m = recipe.model
    return f"""# sfpp toy-world student (Self-Forcing++, stage `{stage}`)

A block-causal Wan-architecture DiT (dim {m.dim}, {m.num_layers} layers, {m.num_heads} heads, ffn {m.ffn_dim}) that
generates {recipe.frame_size}x{recipe.frame_size} video of the procedural world in `train/world.py` at {recipe.fps} fps,
{recipe.frames_per_chunk} latent frames per chunk, 4 denoising steps, over a rolling KV cache of {recipe.window} frames.
Latents are the fixed patch-PCA codec of `sfpp/toy.py` ({recipe.codec_factor}x{recipe.codec_factor} pixel blocks,
{m.in_channels} channels); prompts go through a byte-level text encoder trained with the teacher.

## How it was trained

Recipe `{recipe.name}` in `train/config.py` ({steps}), every stage on CPU:

    python -m train all --recipe {recipe.name} --out {out}

which runs teacher -> ode -> dmd (Self-Forcing baseline) -> extended (Self-Forcing++) -> grpo, then the evaluation
and this packaging step. Each stage resumes from its last checkpoint if interrupted.

## Long-horizon evaluation (`python -m train eval --recipe {recipe.name} --out {out}`)

Teacher horizon {recipe.horizon} latent frames; metrics per {recipe.horizon}-frame window averaged over 16 prompts
(`train/metrics.py`): luminance (exposure), dynamic (mean optical-flow magnitude, px/frame), fidelity (prompted
objects present with their colour, size and speed, against the world's ground truth).

{table}"""
