"""The pipeline end to end on a small random model: streaming, seeds, batches, the sampler math, save/load."""

import math

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.engine.sampler import FlowMatchSchedule, StreamNoise, add_noise, flow_to_x0
from sfpp.models.dit import WanModel
from sfpp.models.text import ByteTextEncoder, ByteTextEncoderConfig
from sfpp.pipeline import Pipeline, StreamSettings
from sfpp.video import LatentPreviewDecoder


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    torch.manual_seed(0)
    model = randomize_(WanModel(TEST_CONFIG), scale=0.1)
    text = ByteTextEncoder(ByteTextEncoderConfig(text_dim=TEST_CONFIG.text_dim, text_len=TEST_CONFIG.text_len))
    settings = StreamSettings(frames_per_chunk=2, window=5, sink=1, height=32, width=48, fps=8)
    return Pipeline(model, text, LatentPreviewDecoder(16), settings=settings, random_weights=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_stream_equals_call_and_frame_counts(pipe):
    for num_frames in (1, 5, 6, 17, 30):
        out = pipe("a red ball", num_frames=num_frames, generator=gen(1), progress=False)
        assert out.frames.shape == (1, num_frames, 32, 48, 3) and out.frames.dtype == torch.uint8
        latent_frames = 1 + math.ceil((num_frames - 1) / 4)
        assert out.latents.shape[2] == math.ceil(latent_frames / 2) * 2
    chunks = list(pipe.stream("a red ball", num_frames=30, generator=gen(1), progress=False))
    assert [c.shape[1] for c in chunks] == [5, 8, 8, 8, 1]  # first latent frame -> 1 video frame, then 4 each
    assert torch.equal(torch.cat(chunks, 1), out.frames)


def test_seconds(pipe):
    assert pipe("x", seconds=2.5, seed=0, progress=False).frames.shape[1] == 20  # 2.5 s at 8 fps


def test_reproducible(pipe):
    a = pipe("a red ball", num_frames=9, seed=3, progress=False).latents
    b = pipe("a red ball", num_frames=9, generator=gen(3), progress=False).latents
    c = pipe("a red ball", num_frames=9, seed=4, progress=False).latents
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_and_prompt_change(pipe):
    both = pipe(["a red ball", "two blue cubes"], num_frames=9, seed=0, progress=False).latents
    assert both.shape[0] == 2 and not torch.allclose(both[0], both[1])
    # The cache is reused across calls; a new prompt replaces its text K/V (and its frames are forgotten).
    first = pipe("a red ball", num_frames=9, seed=5, progress=False).latents
    second = pipe("two blue cubes", num_frames=9, seed=5, progress=False).latents
    fresh = Pipeline(pipe.transformer, pipe.text_encoder, pipe.decoder, settings=pipe.settings)
    assert torch.equal(second, fresh("two blue cubes", num_frames=9, seed=5, progress=False).latents)
    assert not torch.allclose(first, second)


def test_text_encoded_once_per_video(pipe, monkeypatch):
    calls = []
    original = pipe.transformer.text_kv
    monkeypatch.setattr(pipe.transformer, "text_kv", lambda c: calls.append(1) or original(c))
    pipe("a red ball", num_frames=17, seed=0, progress=False)  # 3 chunks x 5 passes
    assert len(calls) == 1


@torch.no_grad()
def test_generation_equals_cache_free_loop(pipe):
    """The streamed latents equal Self-Forcing's sampler written without any cache: each chunk is denoised by a
    full-sequence block-causal forward over [clean previous frames at t=0, current chunk at t], same noise draws."""
    s, sched, model = pipe.settings, pipe.schedule, pipe.transformer
    prompt, num_frames = "a green square", 21  # 6 latent frames = 3 chunks of 2; the window of 5 rolls
    out = pipe(prompt, num_frames=num_frames, seed=7, progress=False).latents
    context = pipe.encode_prompt(prompt)
    g = gen(7)
    frames = []
    h, w = s.height // 8, s.width // 8
    for _ in range(out.shape[2] // s.frames_per_chunk):
        x = torch.randn(1, 16, s.frames_per_chunk, h, w, generator=g)
        for i, sigma in enumerate(sched.sigmas):
            seq = torch.cat(frames + [x], dim=2)
            t = torch.cat([torch.zeros(1, seq.shape[2] - x.shape[2]), torch.full((1, x.shape[2]), 1000 * sigma)], 1)
            flow = model(seq, t, context, frames_per_chunk=s.frames_per_chunk, window=s.window, sink=s.sink)
            x0 = flow_to_x0(x, flow[:, :, -x.shape[2] :], sigma)
            if i + 1 < len(sched.sigmas):
                x = add_noise(x0, torch.randn(x0.shape, generator=g), sched.sigmas[i + 1])
        frames.append(x0)
    torch.testing.assert_close(out, torch.cat(frames, 2), rtol=1e-4, atol=1e-4)


def test_context_noise_changes_the_context(pipe):
    clean = pipe("a", num_frames=13, seed=0, progress=False).latents
    noisy_pipe = Pipeline(
        pipe.transformer,
        pipe.text_encoder,
        pipe.decoder,
        settings=pipe.settings,
        schedule=FlowMatchSchedule(context_noise=100),
    )
    noisy = noisy_pipe("a", num_frames=13, seed=0, progress=False).latents
    n = pipe.settings.frames_per_chunk
    assert not torch.allclose(clean[:, :, n:], noisy[:, :, n:])  # later chunks see a noised context


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = Pipeline.from_pretrained(tmp_path / "m")
    assert loaded.settings == pipe.settings and loaded.random_weights
    a = pipe("a red ball", num_frames=9, seed=2, progress=False).latents
    b = loaded("a red ball", num_frames=9, seed=2, progress=False).latents
    assert torch.equal(a, b)


def test_frame_correlated_schedule_is_drawn_saved_and_loaded(pipe, tmp_path, monkeypatch):
    """A pipeline whose schedule shares noise across frames denoises each chunk with the stream's `StreamNoise`
    draws from the seed, and keeps the schedule through save/load."""
    from sfpp.engine.graph import ChunkRunner

    schedule = FlowMatchSchedule(frame_correlation=0.9, correlated_from=2)
    ours = Pipeline(pipe.transformer, pipe.text_encoder, pipe.decoder, settings=pipe.settings, schedule=schedule)
    seen = []
    real = ChunkRunner.__call__
    monkeypatch.setattr(ChunkRunner, "__call__", lambda self, noises: seen.append(noises.clone()) or real(self, noises))
    out = ours("a red ball", num_frames=21, seed=4, progress=False).latents
    noise = StreamNoise(gen(4), torch.device("cpu"))
    assert len(seen) == 3 and all(torch.equal(got, noise.chunk(schedule, got.shape[1:])) for got in seen)
    assert not torch.equal(out, pipe("a red ball", num_frames=21, seed=4, progress=False).latents)
    ours.save_pretrained(tmp_path / "m")
    loaded = Pipeline.from_pretrained(tmp_path / "m")
    assert loaded.schedule == schedule
    assert torch.equal(loaded("a red ball", num_frames=21, seed=4, progress=False).latents, out)
    with pytest.raises(ValueError, match="frame_correlation 0"):
        ours("a red ball", num_frames=21, seed=4, progress=False, noise_order="self-forcing")


def test_from_config_runs():
    out = Pipeline.from_config("tiny")("hello", seconds=1, seed=0, progress=False)
    assert out.frames.shape == (1, 16, 64, 64, 3)
    assert Pipeline.from_config("tiny").random_weights


@pytest.mark.parametrize(
    "prompt,kwargs,error,match",
    [
        (42, {"num_frames": 5}, TypeError, "prompt must be a string"),
        (["ok", 3], {"num_frames": 5}, TypeError, "prompt must be a string"),
        ([], {"num_frames": 5}, TypeError, "prompt must be a string"),
        ("ok", {"num_frames": 0}, ValueError, "num_frames must be a positive integer"),
        ("ok", {"num_frames": -4}, ValueError, "num_frames must be a positive integer"),
        ("ok", {"num_frames": 2.5}, ValueError, "num_frames must be a positive integer"),
        ("ok", {"seconds": 0}, ValueError, "seconds must be positive"),
        ("ok", {"seconds": -1.0}, ValueError, "seconds must be positive"),
        ("ok", {}, ValueError, "exactly one of num_frames= or seconds="),
        ("ok", {"num_frames": 5, "seconds": 1}, ValueError, "exactly one"),
        ("ok", {"num_frames": 5, "height": 40}, ValueError, "multiples of 16"),
        ("ok", {"num_frames": 5, "width": 0}, ValueError, "multiples of 16"),
        ("ok", {"num_frames": 5, "seed": 1, "generator": torch.Generator()}, ValueError, "not both"),
    ],
)
def test_bad_input(pipe, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(prompt, progress=False, **kwargs)


def self_forcing_noise_reference(seed: int, batch: int, channels: int, frames: int, fc: int, h: int, w: int,
                                 steps: int) -> list[list[torch.Tensor]]:  # fmt: skip
    """Self-Forcing's inference order, written from its description: the caller draws the whole video's noise
    [B, F, C, h, w] first; then block by block, after every denoising step but the last, the prediction [B, Fc, C,
    h, w] flattened to [B * Fc, C, h, w] is re-noised with a fresh standard normal of that shape. Per block:
    [initial [B, Fc, C, h, w], re-noise 1, ...] in [B, Fc, C, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, frames, channels, h, w, generator=gen)
    blocks = []
    for start in range(0, frames, fc):
        block = [video[:, start : start + fc]]
        for _ in range(steps - 1):
            block.append(torch.randn(batch * fc, channels, h, w, generator=gen).unflatten(0, (batch, fc)))
        blocks.append(block)
    return blocks


def test_self_forcing_noise_order(monkeypatch):
    """noise_order="self-forcing": the noise each chunk denoises with is Self-Forcing's draw order from one seed;
    the default order differs; an endless stream cannot draw its whole noise up front."""
    from sfpp.engine.graph import ChunkRunner

    pipe = Pipeline.from_config("tiny", settings=StreamSettings(frames_per_chunk=2, window=4, height=32, width=32))
    seen = []
    real = ChunkRunner.__call__
    monkeypatch.setattr(ChunkRunner, "__call__", lambda self, noises: seen.append(noises.clone()) or real(self, noises))
    frames = 13  # 1 + 4 * 3 video frames = 4 latent frames = 2 chunks of 2 for the latent preview (factor 4)
    out = pipe("a red ball", num_frames=frames, seed=7, progress=False, noise_order="self-forcing")
    steps = len(pipe.schedule.denoising_steps)
    reference = self_forcing_noise_reference(7, 1, 16, 4, 2, 4, 4, steps)
    assert len(seen) == len(reference) == 2
    for got, want in zip(seen, reference, strict=True):
        assert got.shape[0] == steps
        for k in range(steps):  # ours are [B, C, Fc, h, w]
            torch.testing.assert_close(got[k], want[k].permute(0, 2, 1, 3, 4), rtol=0, atol=0)
    seen.clear()
    default = pipe("a red ball", num_frames=frames, seed=7, progress=False)
    assert not torch.equal(seen[0][1], reference[0][1].permute(0, 2, 1, 3, 4))
    assert not torch.equal(out.latents, default.latents)
    with pytest.raises(ValueError, match="give a length"):
        pipe.stream("x", noise_order="self-forcing")
    with pytest.raises(ValueError, match="noise_order must be one of"):
        pipe.stream("x", num_frames=5, noise_order="peer")
