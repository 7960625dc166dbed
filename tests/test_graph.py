"""The chunk runner: eager equals the sampler, CUDA-graph replay and torch.compile equal eager (GPU), no
recompilation per chunk, and an out-of-memory error that says what went wrong."""

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import FlowMatchSchedule, StreamNoise, denoise_chunk, draw_noises
from sfpp.models.dit import WanModel
from sfpp.models.text import ByteTextEncoder, ByteTextEncoderConfig
from sfpp.pipeline import Pipeline, StreamSettings
from sfpp.video import LatentPreviewDecoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPE = (2, 16, 2, 4, 6)  # batch 2, chunks of 2 latent frames, 6 tokens per frame


def setup(device="cpu", window=5, sink=1, **kv):
    torch.manual_seed(0)
    model = randomize_(WanModel(TEST_CONFIG)).to(device).eval()
    context = torch.randn(2, TEST_CONFIG.text_len, TEST_CONFIG.text_dim, generator=torch.Generator().manual_seed(9))

    def cache():
        c = RingKVCache(TEST_CONFIG, batch_size=2, frame_tokens=6, window=window, sink=sink, device=device, **kv)
        c.set_text(model.text_kv(context.to(device)))
        return c

    return model, cache


@pytest.mark.parametrize("context_noise", [0.0, 100.0])
@torch.no_grad()
def test_runner_equals_sampler(context_noise):
    """Pre-drawn noise in the sampler's order: bit-identical chunks, over several wraps of the ring."""
    model, cache = setup()
    schedule = FlowMatchSchedule(context_noise=context_noise)
    runner = ChunkRunner(model, cache(), schedule, cuda_graph=True)  # no CUDA here: runs eagerly
    assert not runner.use_graph and runner.num_noises == 4 + (context_noise > 0)
    ref_cache = cache()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        ours = runner(runner.draw_noise(SHAPE, g1))
        ref = denoise_chunk(
            model.forward_chunk, ref_cache, draw_noises(schedule, SHAPE, g2, torch.device("cpu")), schedule
        )
        ref_cache.advance(SHAPE[2])
        assert torch.equal(ours, ref)
    assert torch.equal(runner.cache.k, ref_cache.k) and runner.cache.frames_done == ref_cache.frames_done == 10


@torch.no_grad()
def test_compiled_chunk_does_not_recompile_per_chunk():
    """The cache's host frame counter must not be baked into the compiled chunk (one recompile, to dynamic)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, cache = setup()
    schedule = FlowMatchSchedule(denoising_steps=(1000, 500))  # fewer passes to trace on a CPU
    runner = ChunkRunner(model, cache(), schedule, compile=True, compile_options={"backend": "eager"})
    eager = ChunkRunner(model, cache(), schedule)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(4):
        torch.testing.assert_close(runner(runner.draw_noise(SHAPE, g1)), eager(eager.draw_noise(SHAPE, g2)))
    assert counters["stats"]["unique_graphs"] <= 2


def tiny_pipe(**options):
    torch.manual_seed(0)
    model = randomize_(WanModel(TEST_CONFIG), scale=0.1)
    text = ByteTextEncoder(ByteTextEncoderConfig(text_dim=TEST_CONFIG.text_dim, text_len=TEST_CONFIG.text_len))
    settings = StreamSettings(frames_per_chunk=2, window=5, sink=1, height=32, width=48, fps=8)
    return Pipeline(model, text, LatentPreviewDecoder(16), settings=settings, **options)


def test_out_of_memory_message(monkeypatch):
    pipe = tiny_pipe()

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ChunkRunner, "__call__", boom)
    with pytest.raises(torch.OutOfMemoryError) as info:
        pipe("a", num_frames=9, seed=0, progress=False)
    msg = str(info.value)
    assert "out of memory on cpu generating batch 1 at 48x32 with a window of 5 latent frames" in msg
    assert "this needs about" in msg and "kv cache" in msg and "dit weights" in msg and "memory='low'" in msg


def test_out_of_memory_estimate_for_the_real_model():
    """The 1.3B model at 832x480, window 21: ~2.6 GiB of bf16 weights and ~5.7 GiB of bf16 self-attention cache."""
    from sfpp.models.dit import get_config

    with torch.device("meta"):
        model = WanModel(get_config("wan2.1-1.3b")).to(torch.bfloat16)
        text = ByteTextEncoder(ByteTextEncoderConfig(text_dim=4096))
    pipe = Pipeline(model, text, LatentPreviewDecoder(16))
    need = pipe.memory_plan(1, 480, 832)
    assert 2.5 < need.dit_weights / 2**30 < 2.7
    assert 5.6 < need.kv_cache / 2**30 < 5.9  # 30 layers x (21 x 1560 + 512) tokens x 1536 x 2 (K, V) x 2 B


# ------------------------------------------------------------------------------------------------ GPU


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@torch.no_grad()
def test_graph_replay_equals_eager(fp8):
    kv = {"kv_dtype": torch.float8_e4m3fn} if fp8 else {}
    model, cache = setup("cuda", **kv)
    graph = ChunkRunner(model, cache(), FlowMatchSchedule(context_noise=50), cuda_graph=True)
    eager = ChunkRunner(model, cache(), FlowMatchSchedule(context_noise=50))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(8):  # past several wraps of the 5-frame ring
        torch.testing.assert_close(graph(graph.draw_noise(SHAPE, g1)), eager(eager.draw_noise(SHAPE, g2)))
    assert graph.replays == 7
    torch.testing.assert_close(graph.cache.k.float(), eager.cache.k.float())
    assert torch.equal(graph.cache.slot_frame, eager.cache.slot_frame)


@cuda
@pytest.mark.gpu
def test_pipeline_graph_and_compile_equal_eager_across_videos():
    eager = tiny_pipe().to("cuda")
    graph = tiny_pipe(cuda_graph=True).to("cuda")
    compiled = tiny_pipe(compile=True, cuda_graph=True).to("cuda")
    for prompt in ("a red ball", "two blue cubes"):  # the second video replays the first one's graph
        ref = eager(prompt, num_frames=21, seed=1, progress=False).latents
        torch.testing.assert_close(graph(prompt, num_frames=21, seed=1, progress=False).latents, ref)
        torch.testing.assert_close(
            compiled(prompt, num_frames=21, seed=1, progress=False).latents, ref, rtol=2e-3, atol=2e-3
        )
    (state,) = graph._states._free  # the second video took the first one's cache and runner back
    assert state.runner.replays == 2 * 3 - 1  # 3 chunks per video, the very first one captured


@pytest.mark.parametrize("schedule", [{}, {"context_noise": 100.0}, {"frame_correlation": 0.9, "correlated_from": 2}])
def test_training_rollout_is_the_inference_loop(schedule):
    """Training rollouts call the same loop as inference: the same noise gives the same video and the same cache,
    the noisy context pass and the noise shared by a stream's frames included."""
    from train.rollout import student_rollout

    model, cache = setup()
    schedule = FlowMatchSchedule(**schedule)
    runner = ChunkRunner(model, cache(), schedule)
    train_cache = cache()
    noise = StreamNoise(torch.Generator().manual_seed(5), torch.device("cpu"))
    with torch.no_grad():
        ours = torch.cat([runner(noise.chunk(schedule, SHAPE)) for _ in range(4)], 2)
    theirs = student_rollout(model, train_cache, SHAPE, 4 * SHAPE[2], schedule, torch.Generator().manual_seed(5))
    assert torch.equal(ours, theirs) and torch.equal(runner.cache.k, train_cache.k)


def test_exit_step_carries_gradient_through_one_forward():
    """exit_step k: the first k steps as at inference (no graph), step k with gradients, the context pass without."""
    model, cache = setup()
    schedule = FlowMatchSchedule()
    noises = draw_noises(schedule, SHAPE, torch.Generator().manual_seed(6), torch.device("cpu"))
    trace = []
    with torch.no_grad():
        denoise_chunk(model.forward_chunk, cache(), noises, schedule, trace=trace)
    calls = []
    forward = lambda x, t, c: calls.append(torch.is_grad_enabled()) or model.forward_chunk(x, t, c)
    x0 = denoise_chunk(forward, cache(), noises, schedule, exit_step=2)
    assert calls == [False, False, True, False] and x0.requires_grad
    torch.testing.assert_close(x0.detach(), trace[2][0])  # x0 of step 2 at inference
    with pytest.raises(ValueError, match="exit_step"):
        denoise_chunk(forward, cache(), noises, schedule, exit_step=4)
