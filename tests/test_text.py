"""The small text encoder: tokenizers, padding zeroed, and a clear error for a bad config."""

import zlib

import pytest
import torch

from sfpp.text import ByteTextEncoder, ByteTextEncoderConfig


def test_word_tokens_are_stable_hashes():
    enc = ByteTextEncoder(ByteTextEncoderConfig(tokenizer="words", text_len=6, word_buckets=97))
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
