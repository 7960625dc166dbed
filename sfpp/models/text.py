"""Text encoders behind one interface: `encode(prompts) -> [B, text_len, text_dim]`, padded positions zeroed.

umT5-XXL (the real Wan path) implements the same interface; `ByteTextEncoder` is a small transformer over UTF-8
bytes or hashed words, for CPU work and the toy world.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ByteTextEncoderConfig:
    text_dim: int = 32
    text_len: int = 16
    num_layers: int = 2
    num_heads: int = 2
    tokenizer: str = "bytes"  # "bytes": UTF-8 bytes; "words": lower-cased words hashed into `word_buckets`
    word_buckets: int = 4096

    def __post_init__(self) -> None:
        if self.tokenizer not in ("bytes", "words"):
            raise ValueError(f"tokenizer must be 'bytes' or 'words', got {self.tokenizer!r}")

    @property
    def vocab_size(self) -> int:
        return 2 + (256 if self.tokenizer == "bytes" else self.word_buckets)


# A word: a run of letters and digits of any script (for ASCII exactly [a-z0-9]+ after lower-casing, so ASCII
# prompts keep the tokens the shipped model was trained on); any other character that is neither ASCII nor space
# (an emoji, a symbol) is a word of its own. ASCII punctuation separates words.
WORD = re.compile(r"[^\W_]+|[^\s\x00-\x7f]")


class ByteTextEncoder(nn.Module):
    """Tokens -> embeddings -> a few transformer layers. Token 0 pads, 1 begins every prompt (so an empty prompt
    still has a token to attend to), byte or word-bucket i is token i + 2. Words (`WORD`, in any script) are hashed
    with CRC-32 of their UTF-8 bytes, which, unlike Python's hash, is the same in every process."""

    def __init__(self, cfg: ByteTextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.position_embedding = nn.Parameter(torch.randn(cfg.text_len, cfg.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim, cfg.num_heads, 4 * cfg.text_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)

    WEIGHTS = "text_encoder.safetensors"

    @property
    def text_dim(self) -> int:
        return self.cfg.text_dim

    @property
    def text_len(self) -> int:
        return self.cfg.text_len

    def to_meta(self) -> dict:
        return {"type": "byte", "config": asdict(self.cfg)}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, str(directory / self.WEIGHTS))

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> ByteTextEncoder:
        from sfpp.models.checkpoint import load_file, load_weights

        with torch.device("meta"):
            encoder = cls(ByteTextEncoderConfig(**meta["config"]))
        return load_weights(encoder, load_file(directory / cls.WEIGHTS), source=str(directory / cls.WEIGHTS))

    def fingerprint(self) -> str:
        """What its embeddings depend on (config and weights), for the prompt-embedding cache."""
        digest = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(t.detach().float().cpu().numpy().tobytes())
        return f"byte-{digest.hexdigest()}"

    def tokenize(self, prompts: list[str]) -> Tensor:
        """[B, text_len] token ids; a prompt longer than text_len - 1 tokens is cut there, with a warning."""
        ids = torch.zeros(len(prompts), self.cfg.text_len, dtype=torch.long)
        limit = self.cfg.text_len - 1
        for i, prompt in enumerate(prompts):
            if self.cfg.tokenizer == "bytes":
                pieces = list(prompt.encode("utf-8"))
            else:
                words = WORD.findall(prompt.lower())
                pieces = [zlib.crc32(w.encode("utf-8")) % self.cfg.word_buckets for w in words]
            if len(pieces) > limit:
                unit = "bytes" if self.cfg.tokenizer == "bytes" else "words"
                ignored = "" if unit == "bytes" else f": {' '.join(words[limit:])!r} is ignored"
                warnings.warn(
                    f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} has {len(pieces)} {unit}; the "
                    f"text encoder reads the first {limit}{ignored}",
                    stacklevel=2,
                )
            data = [1] + [p + 2 for p in pieces][:limit]
            ids[i, : len(data)] = torch.tensor(data, dtype=torch.long)
        return ids

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=pad))
        return x.masked_fill(pad[..., None], 0.0)  # Wan zeroes padded positions

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        device = self.token_embedding.weight.device
        return self(self.tokenize(prompts).to(device))
