"""umT5 through transformers against a from-scratch forward of Wan's T5 encoder, on Wan's checkpoint layout."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from sfpp.models.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sfpp.models.umt5 import UMT5TextEncoder, clean_prompt, convert_wan_t5_to_transformers  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "bounces", "two", "blue", "cubes", "on", "the", "floor"]
DIM, HEADS, FFN, LAYERS, BUCKETS = 32, 4, 48, 2, 32


def make_tokenizer(path):
    """A word-level tokenizer with T5's special tokens (pad 0, eos 1 appended, unk 2), saved as transformers'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return path


def wan_t5_state_dict(seed=0):
    """Random weights in Wan's T5 layout (`models_t5_umt5-xxl-enc-bf16.pth`), umT5: a position bias per block."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: s * torch.randn(*shape, generator=g)
    sd = {"token_embedding.weight": r(len(WORDS) + 3, DIM, s=1.0), "norm.weight": 1 + r(DIM)}
    for i in range(LAYERS):
        sd |= {
            f"blocks.{i}.norm1.weight": 1 + r(DIM),
            f"blocks.{i}.attn.q.weight": r(DIM, DIM),
            f"blocks.{i}.attn.k.weight": r(DIM, DIM),
            f"blocks.{i}.attn.v.weight": r(DIM, DIM),
            f"blocks.{i}.attn.o.weight": r(DIM, DIM),
            f"blocks.{i}.norm2.weight": 1 + r(DIM),
            f"blocks.{i}.ffn.gate.0.weight": r(FFN, DIM),
            f"blocks.{i}.ffn.fc1.weight": r(FFN, DIM),
            f"blocks.{i}.ffn.fc2.weight": r(DIM, FFN),
            f"blocks.{i}.pos_embedding.embedding.weight": r(BUCKETS, HEADS, s=1.0),
        }
    return sd


def wan_t5_reference(sd, ids, mask):
    """Wan's T5 encoder written from its description: RMS norms without mean, unscaled dot-product attention plus a
    bucketed relative position bias (per block in umT5), gated tanh-GELU feed-forward; padded keys masked."""

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel):  # bidirectional, 32 buckets, max distance 128
        half = BUCKETS // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(128 / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    b, n = ids.shape
    x = sd["token_embedding.weight"][ids]
    pos = torch.arange(n)
    buckets = bucket(pos[None, :] - pos[:, None])  # key - query
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{name}.weight"].T).view(b, n, HEADS, -1).transpose(1, 2) for name in "qkv")
        scores = q @ k.transpose(-1, -2) + sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + y @ sd[p + "attn.o.weight"].T
        h = norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (gate * (h @ sd[p + "ffn.fc1.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_t5")
    sd = wan_t5_state_dict()
    torch.save(sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
    make_tokenizer(root / "google" / "umt5-xxl")
    return root, sd


PROMPTS = ["a red ball bounces", "two   blue cubes on the &amp; floor"]


@torch.no_grad()
def test_wan_checkpoint_matches_reference_and_zeroes_padding(files):
    root, sd = files
    enc = UMT5TextEncoder.from_wan(
        root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl", dtype=torch.float32, text_len=12
    )
    assert enc.text_dim == DIM
    ids, mask = enc.tokenize(PROMPTS)
    assert ids.shape == (2, 12) and mask.sum(1).tolist() == [5, 8]  # words + </s>; "&amp;" unescaped to unk
    out = enc.encode(PROMPTS)
    ref = wan_t5_reference(sd, ids, mask)
    assert out.shape == (2, 12, DIM)
    torch.testing.assert_close(out[0, :5], ref[0, :5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :8], ref[1, :8], rtol=1e-4, atol=1e-4)
    assert out[0, 5:].abs().max() == 0 and out[1, 8:].abs().max() == 0  # padding zeroed, as Wan does
    # A prompt's embedding does not depend on what it is batched with (padding is masked, not attended).
    torch.testing.assert_close(enc.encode(PROMPTS[:1])[0], out[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_transformers_directory_round_trip(files, tmp_path):
    root, sd = files
    enc = UMT5TextEncoder.from_wan(
        root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl", dtype=torch.float32, text_len=12
    )
    enc.save(tmp_path)
    again = UMT5TextEncoder.from_meta(enc.to_meta(), tmp_path)
    torch.testing.assert_close(again.encode(PROMPTS), enc.encode(PROMPTS))
    assert again.text_len == 12


def test_conversion_names_and_errors(files, tmp_path):
    root, sd = files
    hf = convert_wan_t5_to_transformers(sd)
    model = transformers.UMT5EncoderModel(
        transformers.UMT5Config(
            vocab_size=len(WORDS) + 3,
            d_model=DIM,
            d_kv=DIM // HEADS,
            d_ff=FFN,
            num_layers=LAYERS,
            num_heads=HEADS,
            feed_forward_proj="gated-gelu",
        )
    )
    assert set(hf) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.0.attn.qkv.weight'"):
        convert_wan_t5_to_transformers({**sd, "blocks.0.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        UMT5TextEncoder.from_wan(root / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "nope")
    assert clean_prompt("  a\n\tb &amp;amp; c ") == "a b & c"


def test_offload_keeps_weights_on_cpu(files):
    root, _ = files
    enc = UMT5TextEncoder.from_wan(
        root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl", dtype=torch.float32, text_len=12
    )
    enc.to("cpu")
    assert enc.encode(["a ball"]).device.type == "cpu"
    assert next(enc.model.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_moves_off_the_gpu_after_encoding(files):
    root, _ = files
    enc = UMT5TextEncoder.from_wan(
        root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl", dtype=torch.float32, text_len=12
    ).to("cuda")
    out = enc.encode(["a red ball"])
    assert out.device.type == "cuda" and next(enc.model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------------------------- prompt-embedding cache


def _encoder(files):
    root, _ = files
    return UMT5TextEncoder.from_wan(
        root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl", dtype=torch.float32, text_len=12
    )


@torch.no_grad()
def test_prompt_cache_encodes_each_prompt_once_and_gives_the_same_embedding(files, tmp_path, monkeypatch):
    from sfpp.pipeline.prompt_cache import PromptCache

    enc = _encoder(files)
    fresh = enc.encode(PROMPTS)
    calls = []
    encode = enc.encode
    monkeypatch.setattr(enc, "encode", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    cache = PromptCache(tmp_path)
    first = cache.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]], enc)
    assert calls == [sorted(PROMPTS)]  # the two distinct prompts, in one batch
    assert torch.equal(first[0], fresh[0]) and torch.equal(first[1], fresh[1]) and torch.equal(first[2], fresh[0])
    again = cache.encode(PROMPTS[::-1], enc)  # from disk: no encoder call, the same bits
    assert len(calls) == 1 and torch.equal(again, fresh.flip(0))
    assert (cache.hits, cache.misses) == (2, 2)  # hits: prompts read from disk; misses: prompts encoded
    # Another encoder (its weights file changed) never reads these embeddings.
    ckpt = files[0] / "models_t5_umt5-xxl-enc-bf16.pth"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    cache.encode(PROMPTS[:1], enc)
    assert calls[-1] == [PROMPTS[0]]


@torch.no_grad()
def test_prompt_cache_re_encodes_a_broken_or_foreign_entry(files, tmp_path):
    from safetensors.torch import save_file

    from sfpp.pipeline.prompt_cache import PromptCache

    enc, cache = _encoder(files), PromptCache(tmp_path)
    fresh = enc.encode(PROMPTS[:1])
    cache.encode(PROMPTS[:1], enc)
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    assert torch.equal(cache.encode(PROMPTS[:1], enc), fresh) and cache.misses == 2
    save_file({"embedding": torch.zeros_like(fresh[0])}, str(entry), metadata={"prompt": "another prompt"})
    assert torch.equal(cache.encode(PROMPTS[:1], enc), fresh) and cache.misses == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_encoder_built_in_memory_is_not_cached(files, tmp_path):
    from sfpp.pipeline.prompt_cache import PromptCache

    enc = _encoder(files)
    enc.sources = ()
    assert enc.fingerprint() is None
    PromptCache(tmp_path).encode(PROMPTS, enc)
    assert not list(tmp_path.rglob("*"))


def test_umt5_xxl_size_in_the_memory_model():
    """The memory model's umT5-XXL parameter count is the encoder transformers builds from umT5-XXL's config."""
    from sfpp.pipeline.memory import UMT5_XXL_PARAMS

    # umT5-XXL's config (its 32 relative-position buckets are transformers' default)
    config = transformers.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu")  # fmt: skip
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(config)
    assert UMT5_XXL_PARAMS == sum(p.numel() for p in model.parameters())
