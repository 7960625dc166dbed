"""The small text encoder: tokenizers (any Unicode word; ASCII as the shipped model was trained), a warning when a
prompt is cut, padding zeroed, and a clear error for a bad config."""

import random
import re
import string
import warnings
import zlib

import pytest
import torch

from sfpp.models.text import WORD, ByteTextEncoder, ByteTextEncoderConfig
from sfpp.pipeline import SHIPPED_MODELS

shipped = pytest.mark.skipif(
    not (SHIPPED_MODELS["default"] / "sfpp_pipeline.json").is_file(), reason="no shipped default model"
)


def test_word_tokens_are_stable_hashes():
    enc = ByteTextEncoder(ByteTextEncoderConfig(tokenizer="words", text_len=6, word_buckets=97))
    with pytest.warns(UserWarning, match="has 8 words"):
        ids = enc.tokenize(["Red, red CIRCLE!", "a b c d e f g h"])
    red = 2 + zlib.crc32(b"red") % 97  # the same in every process (unlike Python's salted hash)
    assert ids[0].tolist() == [1, red, red, 2 + zlib.crc32(b"circle") % 97, 0, 0]
    assert ids[1, -1] != 0 and ids.shape == (2, 6)  # truncated to text_len - 1 words after the start token


def test_byte_tokens_and_zeroed_padding():
    enc = ByteTextEncoder(ByteTextEncoderConfig(text_len=8))
    assert enc.tokenize(["ab"])[0].tolist() == [1, ord("a") + 2, ord("b") + 2, 0, 0, 0, 0, 0]
    out = enc.encode(["ab", ""])
    assert out.shape == (2, 8, 32)
    assert torch.all(out[0, 3:] == 0) and torch.all(out[1, 1:] == 0) and out[0, :3].abs().sum() > 0
    assert torch.isfinite(out).all()  # an empty prompt still attends to its start token


def test_bad_tokenizer():
    with pytest.raises(ValueError, match="tokenizer must be 'bytes' or 'words'"):
        ByteTextEncoderConfig(tokenizer="sentencepiece")


def _old_word_ids(enc: ByteTextEncoder, prompt: str) -> list[int]:
    """The words tokenizer as the shipped model was trained with it: ASCII [a-z0-9]+ runs, CRC-32 buckets."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    ids = [1] + [2 + zlib.crc32(w.encode()) % enc.cfg.word_buckets for w in words][: enc.cfg.text_len - 1]
    return ids + [0] * (enc.cfg.text_len - len(ids))


@shipped
def test_ascii_prompts_keep_the_shipped_model_embeddings():
    """Any ASCII prompt (punctuation, underscores, digits, case, control characters, random strings) gets exactly the
    tokens, hence bit-identical embeddings, of the tokenizer the shipped model was trained with."""
    from sfpp.pipeline import Pipeline

    enc = Pipeline.from_pretrained("default").text_encoder
    rng = random.Random(0)
    prompts = [
        "a big red circle moving fast and a small blue square moving slowly over a striped grey background",
        "A BIG_RED circle, moving fast!!! over a checkered-teal background; camera panning left.",
        "snake_case 3x4 x2y 007 \t\n tabs\x00and\x7fcontrol",
        "",
        " ".join(["word"] * 40),
    ] + ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 120))) for _ in range(200)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long ones are truncated, with a warning
        ids = enc.tokenize(prompts)
        old = torch.tensor([_old_word_ids(enc, p) for p in prompts])
        assert torch.equal(ids, old)
        with torch.no_grad():
            assert torch.equal(enc.encode(prompts[:5]), enc(old[:5]))


@pytest.mark.parametrize("prompt", ["赤い円が速く動く", "🔴 🟦", "café ñandú", "Ωμέγα", "x²"])
def test_unicode_words_are_hashed_not_dropped(prompt):
    enc = ByteTextEncoder(ByteTextEncoderConfig(tokenizer="words", text_len=8, word_buckets=4096))
    ids = enc.tokenize([prompt, ""])
    assert not torch.equal(ids[0], ids[1])  # not the empty prompt's tokens
    words = WORD.findall(prompt.lower())
    assert ids[0, 1 : 1 + len(words)].tolist() == [2 + zlib.crc32(w.encode()) % 4096 for w in words]
    assert enc.tokenize(["🔴"])[0, 1] != enc.tokenize(["🟦"])[0, 1]  # each symbol its own word


@pytest.mark.parametrize("tokenizer,prompt,words", [
    ("words", "a b c d e f g h", "has 8 words; the text encoder reads the first 5: 'f g h' is ignored"),
    ("bytes", "abcdefgh", "has 8 bytes; the text encoder reads the first 5"),
])  # fmt: skip
def test_truncation_warns(tokenizer, prompt, words):
    enc = ByteTextEncoder(ByteTextEncoderConfig(tokenizer=tokenizer, text_len=6))
    with pytest.warns(UserWarning, match=re.escape(words)):
        enc.tokenize([prompt])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits: no warning
        enc.tokenize([prompt[: 5 if tokenizer == "bytes" else 9]])


@shipped
def test_cli_prints_the_truncation_warning_on_one_line(tmp_path, capsys):
    from sfpp.cli import main

    prompt = " ".join(f"w{i}" for i in range(40))
    assert main(["generate", "-p", prompt, "-n", "1", "--quiet", "-o", str(tmp_path / "o.mp4")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"sfpp: warning: the prompt {prompt[:40]!r}... has 40 words; the text encoder reads the first 31: "
                     f"{' '.join(f'w{i}' for i in range(31, 40))!r} is ignored"]  # fmt: skip
