"""The real-model recipe's inputs, from what users have on disk: a Wan2.1 directory (Wan's original layout or
diffusers'), a prompt file (one prompt a line) and, optionally, a Self-Forcing checkpoint.

DMD needs no video data, only prompts (paper, appendix "Implementation details"): the prompts are encoded once by
umT5 into <out>/teacher/final/prompts.safetensors (the `teacher` stage of this recipe, which trains nothing: the
teacher is Wan2.1 itself), and every later stage reads the embeddings, never the 11 GB text encoder. The Wan VAE is
loaded only where pixels are needed (GRPO's optical-flow reward).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from sfpp.models.dit import WanModel
from train.common import Dist, info

PROMPTS = "prompts.safetensors"


def _require(recipe) -> Path:
    if not recipe.wan_dir or not recipe.prompt_file:
        raise ValueError(f"recipe {recipe.name!r} trains from Wan2.1's weights: pass --wan-dir DIR and --prompts FILE")
    return Path(recipe.wan_dir)


def _load(recipe, *, dit: bool):
    """(DiT or a meta-device one, umT5 encoder, VAE) from either layout."""
    from sfpp.models.wan_checkpoints import detect_layout, load_diffusers_directory, load_wan_directory

    directory = _require(recipe)
    layout = detect_layout(directory)
    if layout == "wan":
        return load_wan_directory(directory, dtype=torch.float32, load_dit_weights=dit)
    if layout == "diffusers":
        return load_diffusers_directory(directory, dtype=torch.float32, load_dit_weights=dit)
    raise FileNotFoundError(f"{directory} is neither a Wan2.1 directory nor a diffusers one")


def read_prompts(path: str | Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [p for p in lines if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one prompt a line)")
    return prompts


def prompts_key(recipe) -> dict:
    """What the cached embeddings depend on: the prompts, the negative prompt, the text encoder's files."""
    import hashlib

    directory = _require(recipe)
    rel = [p.relative_to(directory) for p in directory.rglob("*") if p.is_file()]
    # Wan's layout: models_t5_*.pth and google/umt5-xxl/; diffusers': text_encoder/ and tokenizer/. Lists, not
    # tuples: the key is compared with its JSON copy.
    encoder = sorted(
        [str(r), (directory / r).stat().st_size]
        for r in rel
        if "t5" in str(r).lower() or r.parts[0] in ("text_encoder", "tokenizer")
    )
    text = "\n".join(read_prompts(recipe.prompt_file))
    return {
        "prompts_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "negative_prompt": recipe.negative_prompt,
        "text_encoder_files": encoder,
    }


def prepare(recipe, out: Path, env: Dist) -> None:
    """Encode the prompt file and the unconditional prompt with umT5, once, into <out>/teacher/final/."""
    _require(recipe)
    final = out / "teacher" / "final"
    key = prompts_key(recipe)
    if (final / "DONE").is_file():
        cached = json.loads((final / "prompts_key.json").read_text()) if (final / "prompts_key.json").is_file() else {}
        if cached != key:  # (a run directory from before the key was written has none: it cannot say, re-encode)
            raise ValueError(
                f"{final} holds the embeddings of other prompts (or another text encoder / negative prompt): "
                "use another --out for another prompt file"
            )
        info(env, f"[teacher] prompt embeddings already in {final}")
        return
    if env.is_main:
        from safetensors.torch import save_file

        prompts = read_prompts(recipe.prompt_file)
        _, text_encoder, _ = _load(recipe, dit=False)
        if text_encoder.text_dim != recipe.model.text_dim:
            raise ValueError(f"umT5 width {text_encoder.text_dim} != the DiT's text_dim {recipe.model.text_dim}")
        text_encoder.to(env.device)
        batches = [text_encoder.encode(prompts[i : i + 8]).float().cpu() for i in range(0, len(prompts), 8)]
        embeddings = torch.cat(batches)  # [P, text_len, text_dim], zero past each prompt
        uncond = text_encoder.encode([recipe.negative_prompt]).float().cpu()
        final.mkdir(parents=True, exist_ok=True)
        save_file({"prompts": embeddings.to(torch.bfloat16), "uncond": uncond.to(torch.bfloat16)}, str(final / PROMPTS))
        (final / "prompts.json").write_text(json.dumps(prompts, indent=0) + "\n")
        (final / "prompts_key.json").write_text(json.dumps(key) + "\n")
        del text_encoder  # not resident while training: every later stage reads the embeddings
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        (final / "DONE").write_text("ok\n")
        info(env, f"[teacher] {len(prompts)} prompts encoded -> {final / PROMPTS}")
    if env.world_size > 1:
        torch.distributed.barrier()


class PromptTable:
    """Precomputed umT5 embeddings, looked up by prompt; "" is the unconditional (negative) prompt."""

    def __init__(self, out: Path, device: torch.device) -> None:
        from sfpp.models.checkpoint import load_file

        final = Path(out) / "teacher" / "final"
        if not (final / PROMPTS).is_file():
            raise FileNotFoundError(f"{final / PROMPTS} is missing: run the teacher stage (it encodes the prompts)")
        data = load_file(final / PROMPTS)
        self.prompts: list[str] = json.loads((final / "prompts.json").read_text())
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.embeddings, self.uncond = data["prompts"].float().to(device), data["uncond"].float().to(device)

    def pick(self, seeds: list[int]) -> list[str]:
        return [self.prompts[s % len(self.prompts)] for s in seeds]

    def lookup(self, prompts: list[str]) -> Tensor:  # [B, text_len, text_dim]
        rows = [self.uncond[0] if p == "" else self.embeddings[self.index[p]] for p in prompts]
        return torch.stack(rows)


def teacher(recipe, device: torch.device) -> WanModel:
    """The Wan2.1 DiT of wan_dir, fp32 (the stage casts it to its compute dtype; the critic starts from it)."""
    model, _, _ = _load(recipe, dit=True)
    if model.cfg != recipe.model:
        raise ValueError(f"{recipe.wan_dir} holds a DiT {model.cfg}, the recipe expects {recipe.model}")
    return model.float().to(device).eval().requires_grad_(False)


def student_init(recipe, device: torch.device) -> WanModel:
    """The student from a Self-Forcing checkpoint (`generator_ema`, else `generator`)."""
    from sfpp.models.wan_checkpoints import load_checkpoint

    with torch.device("meta"):
        model = WanModel(recipe.model)
    load_checkpoint(model, recipe.student_checkpoint, dtype=torch.float32)
    return model.to(device)


class VAEFrames:
    """Latents -> uint8 frames [B, T, H, W, 3] through the Wan VAE (loaded on first use)."""

    def __init__(self, recipe, device: torch.device) -> None:
        self.recipe, self.device, self.vae = recipe, device, None

    @torch.no_grad()
    def decode_frames(self, z: Tensor) -> Tensor:
        if self.vae is None:
            _, _, vae = _load(self.recipe, dit=False)
            self.vae = vae.float().to(self.device)
        video = self.vae.decode(z.to(self.device)).clamp(-1, 1)  # [B, 3, T, H, W]
        return ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
