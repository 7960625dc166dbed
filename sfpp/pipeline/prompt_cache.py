"""Prompt embeddings kept on disk, so that a prompt is encoded once: umT5-XXL is 11 GB of weights and seconds of
work per prompt (minutes on a CPU), the DiT needs only its [text_len, 4096] output.

One file per (text encoder, prompt): `<dir>/<encoder fingerprint>/<sha256 of the prompt>.safetensors`, the prompt
itself in the file's metadata (checked on reading). The encoder's fingerprint names its weights (`fingerprint()`
of each text encoder), so other weights never read these embeddings. Entries are written to a temporary file and
renamed: a reader never sees half a file, and two processes writing the same prompt both write the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

ENV = "SFPP_CACHE_DIR"


def default_directory() -> Path:
    """$SFPP_CACHE_DIR, else $XDG_CACHE_HOME/sfpp, else ~/.cache/sfpp; embeddings go under prompt_embeddings/."""
    base = os.environ.get(ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sfpp"
    return Path(base) / "prompt_embeddings"


class PromptCache:
    """`encode(prompts, encoder) -> [B, text_len, dim]`: cached prompts are read, the others encoded in one batch and
    written. Exact: each prompt is padded to the encoder's text length on its own, so batching changes nothing."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.hits = self.misses = 0

    def _file(self, fingerprint: str, prompt: str) -> Path:
        return self.directory / fingerprint / f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}.safetensors"

    def _read(self, file: Path, prompt: str) -> Tensor | None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None
                return f.get_tensor("embedding")
        except (OSError, ValueError, RuntimeError, SafetensorError):  # absent, or not safetensors: encode it again
            return None

    def _write(self, file: Path, prompt: str, embedding: Tensor) -> None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        save_file({"embedding": embedding.contiguous().cpu()}, str(tmp), metadata={"prompt": prompt})
        os.replace(tmp, file)

    def encode(self, prompts: list[str], encoder) -> Tensor:
        fingerprint = encoder.fingerprint()
        if fingerprint is None:  # an encoder with nothing to name it by: no caching
            return encoder.encode(prompts)
        files = [self._file(fingerprint, p) for p in prompts]
        found = [self._read(f, p) for f, p in zip(files, prompts, strict=True)]
        missing = sorted({p for p, e in zip(prompts, found, strict=True) if e is None})
        self.hits += len(prompts) - sum(e is None for e in found)
        self.misses += len(missing)
        if missing:
            fresh = dict(zip(missing, encoder.encode(missing).cpu(), strict=True))
            for p in missing:
                self._write(self._file(fingerprint, p), p, fresh[p])
            found = [fresh[p] if e is None else e for p, e in zip(prompts, found, strict=True)]
        return torch.stack(found)
