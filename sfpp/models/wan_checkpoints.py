"""Finding and loading what users have on disk: Wan2.1's original layout, the diffusers layout, and Self-Forcing
generator checkpoints.

    Wan original                          diffusers                              Self-Forcing
    config.json                           model_index.json                       a .pt with `generator` and/or
    diffusion_pytorch_model*.safetensors  transformer/{config.json, *.safetensors} `generator_ema`, keys maybe
    Wan2.1_VAE.pth                        vae/{config.json, *.safetensors}       prefixed `model.`: DiT weights
    models_t5_umt5-xxl-enc-bf16.pth       text_encoder/ (UMT5EncoderModel)        that replace a directory's
    google/umt5-xxl/ (tokenizer)          tokenizer/                             (`checkpoint=`)

Weights are read tensor by tensor (safetensors `safe_open`, memory-mapped .pth), cast on the way, and assigned to
models built on the meta device: no second full copy in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from sfpp.models.checkpoint import CheckpointError, convert_diffusers_to_wan, is_diffusers_layout, load_weights
from sfpp.models.dit import CONFIGS, WanConfig, WanModel

WAN_CONFIG = "config.json"
WAN_DIT = "diffusion_pytorch_model.safetensors"
WAN_VAE = "Wan2.1_VAE.pth"
WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER = "google/umt5-xxl"
DIFFUSERS_INDEX = "model_index.json"


def detect_layout(directory: Path) -> str | None:
    """ "sfpp", "wan", "diffusers" or None."""
    if (directory / "sfpp_pipeline.json").is_file():
        return "sfpp"
    if (directory / DIFFUSERS_INDEX).is_file():
        return "diffusers"
    if (directory / WAN_CONFIG).is_file():
        return "wan"  # whatever part is missing gets named when loading
    return None


# ----------------------------------------------------------------------------------------------- reading tensors


def _weight_files(directory: Path, *, required: bool = True, what: str = "DiT weights") -> list[Path]:
    """`diffusion_pytorch_model.safetensors`, or the shards its `.index.json` lists."""
    single = directory / WAN_DIT
    if single.is_file():
        return [single]
    index = directory / (WAN_DIT + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: shards {missing} listed in {index} are missing")
        return [directory / s for s in shards]
    if required:
        raise FileNotFoundError(f"{what} not found: {single} (or a sharded {index.name})")
    return []


def read_weights(files: list[Path] | Path, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read .safetensors (tensor by tensor, memory-mapped) or .pt/.pth (memory-mapped), casting floating tensors to
    `dtype` as they are read."""
    from sfpp.models.checkpoint import load_file

    files = [files] if isinstance(files, Path | str) else files
    out: dict[str, Tensor] = {}
    for path in map(Path, files):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        out[key] = _cast(f.get_tensor(key), dtype)
            except Exception as exc:
                raise CheckpointError(f"could not read checkpoint {path}: {exc}") from exc
        else:
            out.update({k: _cast(v, dtype) if isinstance(v, Tensor) else v for k, v in load_file(path).items()})
    return out


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# ----------------------------------------------------------------------------------------------- DiT configs


def config_from_wan(d: dict, *, source: str = WAN_CONFIG) -> WanConfig:
    """WanConfig from Wan's own `config.json` (dim, ffn_dim, num_heads, num_layers, in_dim, out_dim, ...)."""
    if d.get("model_type", "t2v") != "t2v":
        raise ValueError(f"{source}: model_type {d['model_type']!r} is not supported; sfpp runs Wan2.1 text-to-video")
    keys = {"dim": "dim", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "num_heads": "num_heads",
            "num_layers": "num_layers", "in_dim": "in_channels", "out_dim": "out_channels", "text_len": "text_len",
            "eps": "eps", "text_dim": "text_dim", "qk_norm": "qk_norm", "cross_attn_norm": "cross_attn_norm",
            "patch_size": "patch_size"}  # fmt: skip
    return WanConfig.from_dict({ours: d[theirs] for theirs, ours in keys.items() if theirs in d})


def config_from_diffusers(d: dict) -> WanConfig:
    """WanConfig from a diffusers `WanTransformer3DModel` config."""
    keys = {"ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "num_attention_heads": "num_heads",
            "num_layers": "num_layers", "in_channels": "in_channels", "out_channels": "out_channels",
            "text_dim": "text_dim", "eps": "eps", "cross_attn_norm": "cross_attn_norm", "patch_size": "patch_size",
            "rope_max_seq_len": "rope_max_positions"}  # fmt: skip
    cfg = {ours: d[theirs] for theirs, ours in keys.items() if theirs in d}
    cfg["dim"] = d["num_attention_heads"] * d["attention_head_dim"]
    return WanConfig.from_dict(cfg)


def _size_of(sd: dict[str, Tensor]) -> tuple[int, int] | None:
    """(dim, num_layers) of a DiT state dict in Wan's names, or None if it does not look like one."""
    q = sd.get("blocks.0.self_attn.q.weight")
    if q is None:
        return None
    return q.shape[0], 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def _name_of(dim: int, layers: int) -> str:
    names = [n for n, c in CONFIGS.items() if (c.dim, c.num_layers) == (dim, layers)]
    return f"dim {dim}, {layers} layers" + (f" ({names[0]})" if names else "")


def check_model_size(cfg: WanConfig, sd: dict[str, Tensor], *, source: str) -> None:
    """A checkpoint of another model size gets one clear sentence instead of hundreds of shape mismatches."""
    size = _size_of(sd)
    if size is not None and size != (cfg.dim, cfg.num_layers):
        raise CheckpointError(
            f"{source} is a checkpoint of a different model size: {_name_of(*size)}, but the model is "
            f"{_name_of(cfg.dim, cfg.num_layers)}. Use the checkpoint with the model it was trained from."
        )


# ----------------------------------------------------------------------------------------------- Self-Forcing


_WRAPPER_PREFIXES = ("model.", "module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def generator_state_dict(ckpt: dict, *, ema: bool = True, source: str = "checkpoint") -> dict[str, Tensor]:
    """The DiT weights of a Self-Forcing-style checkpoint: `generator_ema` (if `ema` and present) or `generator`,
    or a plain state dict; wrapper prefixes (`model.`, FSDP's, torch.compile's) are stripped."""
    entries = [k for k in (("generator_ema", "generator") if ema else ("generator", "generator_ema")) if k in ckpt]
    if entries:
        sd = ckpt[entries[0]]
    elif all(isinstance(v, Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise CheckpointError(
            f"{source} has neither `generator` nor `generator_ema` weights nor a plain state dict; its entries are "
            f"{sorted(ckpt)[:8]}"
        )
    out = {}
    for key, value in sd.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")] = value
    return out


def checkpoint_entries(raw: dict) -> set[str]:
    """The top-level entries of a checkpoint as `read_weights` returns it (`generator`, `generator_ema`,
    `generator_lora`, ...) that name parts rather than tensors; empty for a plain state dict."""
    return {k for k, v in raw.items() if isinstance(v, dict)}


def load_dit(cfg: WanConfig, weights: dict[str, Tensor], *, source: str, model: WanModel | None = None) -> WanModel:
    """Load Wan-, diffusers- or Self-Forcing-named DiT weights into a meta-device model (or `model`)."""
    if is_diffusers_layout(weights):
        weights = convert_diffusers_to_wan(weights)
    check_model_size(cfg, weights, source=source)
    if model is None:
        with torch.device("meta"):
            model = WanModel(cfg)
    return load_weights(model, weights, source=source)


def load_checkpoint(
    model: WanModel,
    checkpoint: str | Path | dict,
    *,
    ema: bool = True,
    dtype: torch.dtype | None = None,
    source: str | None = None,
):
    """Replace `model`'s DiT weights with those of a checkpoint (.safetensors, or a Self-Forcing .pt): a file, or
    its contents as `read_weights` returned them (read once by a caller that looked at its entries first)."""
    if isinstance(checkpoint, dict):
        raw, source = checkpoint, source or "checkpoint"
    else:
        raw, source = read_weights(Path(checkpoint), dtype=dtype), str(checkpoint)
    return load_dit(model.cfg, generator_state_dict(raw, ema=ema, source=source), source=source, model=model)


# ----------------------------------------------------------------------------------------------- the VAE


def convert_diffusers_vae_to_wan(sd: dict[str, Tensor], num_res_blocks: int = 2) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict to Wan's `Wan2.1_VAE.pth` names."""
    per_level = num_res_blocks + 2  # residual blocks + an upsampler per decoder level
    resnet = [(".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
              (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]  # fmt: skip
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^quant_conv\.", "conv1.", key)
        new = re.sub(r"^post_quant_conv\.", "conv2.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", new)
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".middle.{2 * int(m[1])}.", new)
        new = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", new)
        new = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.",
            new,
        )
        if re.match(r"^(encoder\.downsamples|decoder\.upsamples|encoder\.middle|decoder\.middle)\.\d+\.", new):
            head, tail = re.match(r"^(\w+\.\w+\.\d+)(\..*)$", new).groups()
            for a, b in resnet:
                if tail.startswith(a):
                    tail = b + tail[len(a) :]
            new = head + tail
        out[new] = value
    return out


def load_vae(path: Path, *, dtype: torch.dtype | None = None):
    """Wan's `Wan2.1_VAE.pth` file, or a diffusers `vae/` folder."""
    from sfpp.models.vae import WanVAE, WanVAEConfig

    if path.is_dir():
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        cfg = WanVAEConfig.from_dict(
            {
                k: v
                for k, v in {
                    "z_dim": config.get("z_dim"),
                    "base_dim": config.get("base_dim"),
                    "dim_mult": config.get("dim_mult"),
                    "num_res_blocks": config.get("num_res_blocks"),
                    "latents_mean": config.get("latents_mean"),
                    "latents_std": config.get("latents_std"),
                    "temporal_downsample": config.get("temperal_downsample"),
                }.items()
                if v is not None
            }  # fmt: skip
        )
        sd = convert_diffusers_vae_to_wan(read_weights(_weight_files(path, what="VAE weights"), dtype=dtype),
                                          cfg.num_res_blocks)  # fmt: skip
        source = str(path)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"VAE weights not found: {path}")
        sd, source = read_weights(path, dtype=dtype), str(path)
        conv = sd.get("decoder.head.2.weight")  # Wan2.1's structure; the width is read off the weights
        cfg = WanVAEConfig(base_dim=conv.shape[1]) if conv is not None else WanVAEConfig()
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return load_weights(vae, sd, source=source).eval()


# ----------------------------------------------------------------------------------------------- whole directories


def _require(path: Path, what: str, directory: Path, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{layout} directory {directory} is missing the {what}: {path.name} not found")
    return path


def load_wan_directory(
    directory: Path, *, dtype: torch.dtype | None = None, load_dit_weights: bool = True
) -> tuple[WanModel, object, object]:
    """(transformer, text encoder, VAE) from Wan's original layout."""
    from sfpp.models.umt5 import UMT5TextEncoder

    layout = "Wan2.1"
    config = _require(directory / WAN_CONFIG, "DiT config", directory, layout)
    cfg = config_from_wan(json.loads(config.read_text()), source=str(config))
    vae = load_vae(_require(directory / WAN_VAE, "VAE", directory, layout))
    t5 = _require(directory / WAN_T5, "umT5 text encoder", directory, layout)
    tokenizer = _require(directory / WAN_TOKENIZER, "umT5 tokenizer folder", directory, layout)
    text_encoder = UMT5TextEncoder.from_wan(t5, tokenizer, text_len=cfg.text_len, dtype=dtype or torch.bfloat16)
    transformer = _dit(cfg, directory, dtype=dtype, load_weights=load_dit_weights)
    return transformer, text_encoder, vae


def load_diffusers_directory(
    directory: Path, *, dtype: torch.dtype | None = None, load_dit_weights: bool = True
) -> tuple[WanModel, object, object]:
    """(transformer, text encoder, VAE) from the diffusers layout (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`)."""
    from sfpp.models.umt5 import UMT5TextEncoder

    layout = "diffusers"
    sub = {name: _require(directory / name, f"{name} folder", directory, layout)
           for name in ("transformer", "vae", "text_encoder", "tokenizer")}  # fmt: skip
    config = _require(sub["transformer"] / "config.json", "transformer config", directory, layout)
    cfg = config_from_diffusers(json.loads(config.read_text()))
    vae = load_vae(sub["vae"])
    text_encoder = UMT5TextEncoder.from_pretrained(sub["text_encoder"], sub["tokenizer"], text_len=cfg.text_len)
    transformer = _dit(cfg, sub["transformer"], dtype=dtype, load_weights=load_dit_weights)
    return transformer, text_encoder, vae


def _dit(cfg: WanConfig, directory: Path, *, dtype: torch.dtype | None, load_weights: bool) -> WanModel:
    if not load_weights:  # a checkpoint= will provide them
        with torch.device("meta"):
            return WanModel(cfg)
    files = _weight_files(directory)
    return load_dit(cfg, read_weights(files, dtype=dtype), source=str(files[0] if len(files) == 1 else directory))
