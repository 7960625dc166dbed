"""umT5-XXL text encoder (Wan2.1's) through transformers' `UMT5EncoderModel`.

Loads either a transformers directory (`config.json` + weights) or Wan's own `models_t5_umt5-xxl-enc-bf16.pth`,
whose keys are mapped onto transformers' names. As in Wan, prompts are cleaned, tokenized to `text_len` tokens with
padding, encoded with the padding masked out, and padded positions are zeroed in the output. With `offload`, the
weights live on the CPU and visit the GPU only while encoding.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import torch
from torch import Tensor

# Wan's T5 parameter names -> transformers' UMT5EncoderModel names (per block i).
_WAN_TO_HF_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def convert_wan_t5_to_transformers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename Wan's T5 encoder state dict (`blocks.N.attn.q.weight`, ...) to `UMT5EncoderModel`'s names."""
    from sfpp.models.checkpoint import CheckpointError

    out = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key)) and m[2] in _WAN_TO_HF_BLOCK:
            out[f"encoder.block.{m[1]}.{_WAN_TO_HF_BLOCK[m[2]]}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Wan T5 checkpoint (is it the umT5 encoder?)")
    return out


def umt5_config_from_wan(state_dict: dict[str, Tensor]):
    """The `UMT5Config` of a Wan T5 encoder state dict, read off its tensor shapes."""
    from transformers import UMT5Config

    vocab, dim = state_dict["token_embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=state_dict["blocks.0.attn.q.weight"].shape[0] // num_heads,
        d_ff=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix text (ftfy when installed), unescape HTML, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """`encode(prompts) -> [B, text_len, d_model]` with padded positions zeroed: the pipeline's text encoder."""

    MODEL_DIR = "text_encoder"
    TOKENIZER_DIR = "tokenizer"

    def __init__(self, model, tokenizer, *, text_len: int = 512, offload: bool = True) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.offload = offload
        self.device = torch.device("cpu")  # where encoding runs and embeddings are returned
        self.sources: tuple[Path, ...] = ()  # the files and folders it was loaded from (its `fingerprint`)

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    # --- loading

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer_dir: str | Path, **kwargs) -> UMT5TextEncoder:
        """A transformers `UMT5EncoderModel` directory and a tokenizer directory."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        for what, path in (("umT5 encoder", model_dir), ("tokenizer", tokenizer_dir)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{what} directory not found: {path}")
        model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=kwargs.pop("dtype", "auto"))
        encoder = cls(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), **kwargs)
        encoder.sources = (Path(model_dir), Path(tokenizer_dir))
        return encoder

    @classmethod
    def from_wan(
        cls, checkpoint: str | Path, tokenizer_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16, **kwargs
    ) -> UMT5TextEncoder:
        """Wan's `models_t5_umt5-xxl-enc-bf16.pth` and its `google/umt5-xxl` tokenizer folder. The model is built
        on the meta device and takes the checkpoint's tensors: no second copy."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        from sfpp.models.checkpoint import load_file

        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        wan_sd = load_file(checkpoint)
        config = umt5_config_from_wan(wan_sd)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        sd = {k: v.to(dtype) for k, v in convert_wan_t5_to_transformers(wan_sd).items()}
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            from sfpp.models.checkpoint import CheckpointError

            raise CheckpointError(f"{checkpoint} does not fit umT5: missing {missing}, unexpected {unexpected}")
        model.encoder.embed_tokens = model.shared  # tied, as transformers expects
        encoder = cls(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), **kwargs)
        encoder.sources = (Path(checkpoint), Path(tokenizer_dir))
        return encoder

    def fingerprint(self) -> str | None:
        """What its embeddings depend on, for the prompt-embedding cache: the files it was loaded from (path, size,
        modification time: hashing 11 GB of weights would cost more than encoding), its dtype and text length.
        None for a model built in memory (nothing on disk to name it by)."""
        if not self.sources:
            return None
        files = [f for s in self.sources for f in (sorted(s.rglob("*")) if s.is_dir() else [s]) if f.is_file()]
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = json.dumps([self.text_len, str(self.model.dtype), stats])
        return f"umt5-{hashlib.sha256(key.encode()).hexdigest()}"

    # --- the pipeline's part interface

    def to_meta(self) -> dict:
        return {"type": "umt5", "text_len": self.text_len}

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(Path(directory) / self.MODEL_DIR)
        self.tokenizer.save_pretrained(Path(directory) / self.TOKENIZER_DIR)

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> UMT5TextEncoder:
        directory = Path(directory)
        return cls.from_pretrained(
            directory / cls.MODEL_DIR, directory / cls.TOKENIZER_DIR, text_len=meta.get("text_len", 512)
        )

    def eval(self) -> UMT5TextEncoder:
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> UMT5TextEncoder:
        """Encode on `device`. Without offload the weights move there now; with it, only while encoding."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.model.to(dtype=dtype)
        if not self.offload:
            self.model.to(self.device)
        return self

    # --- encoding

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """[B, text_len, d_model] on `self.device`, zero where the prompt is padding."""
        ids, mask = (t.to(self.device) for t in self.tokenize(prompts))
        if self.offload:
            self.model.to(self.device)
        try:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            if self.offload and self.device.type != "cpu":
                self.model.to("cpu")
                torch.cuda.empty_cache()
        return hidden * mask[..., None].to(hidden.dtype)
