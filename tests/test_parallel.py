"""Context parallel (Ulysses) on CPU over gloo: a stream split over processes equals the stream on one process.

One spawn of 2 processes runs every split scenario (sinks, ring wrap, a re-base past the RoPE table, a prompt switch
with KV re-cache, batch 2; an fp8 KV cache through the kernels' torch backend; a continuation from given frames
through `from_pretrained(..., parallel="ulysses")`; a seed drawn on rank 0; per-rank cache memory; bad degrees), then
rank 1 dies and rank 0 must get a clear error, not a hang. The test process computes the same streams on one
process and compares. Tolerance: 1e-5 absolute on fp32 latents of magnitude ~1 (float rounding; on this CPU the
split is bitwise equal: each rank's per-token matmuls and per-head attention are the same sums in the same order).
"""

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TEST_CONFIG, randomize_

import sfpp
from sfpp.engine.cache import RingKVCache
from sfpp.engine.parallel import ContextParallel, ContextParallelError
from sfpp.models.dit import WanModel
from sfpp.models.taehv import TAEHVDecoder
from sfpp.models.text import ByteTextEncoder, ByteTextEncoderConfig
from sfpp.pipeline import Pipeline, StreamSettings
from sfpp.video import LatentPreviewDecoder

# 4 heads (N = 2 or 4), a RoPE table of 16 latent frames: 12 chunks of 2 re-base once and wrap the ring of
# 1 sink + 5 window frames three times.
CFG = dataclasses.replace(TEST_CONFIG, num_heads=4, rope_max_positions=16)
SETTINGS = StreamSettings(frames_per_chunk=2, window=5, sink=1, height=32, width=64, fps=8)  # 2x4 = 8 tokens/frame
NUM_FRAMES = 90  # 23 latent frames: 12 chunks
PROMPTS = ["red", "cubes"]  # batch 2
SWITCH = [(5.0, "sky")]  # at 40 frames: a prompt switch with KV re-cache
SHIPPED = Path(sfpp.__file__).parent / "assets" / "default"
TOLERANCE = 1e-5
DEAD_RANK_TIMEOUT_S = 20
STUCK_TIMEOUT_S = 3


def tiny_pipe(**options) -> Pipeline:
    torch.manual_seed(0)
    model = randomize_(WanModel(CFG), scale=0.1).eval()
    text = ByteTextEncoder(ByteTextEncoderConfig(text_dim=CFG.text_dim, text_len=CFG.text_len))
    return Pipeline(model, text, LatentPreviewDecoder(16), settings=SETTINGS, **options)


def stream(pipe: Pipeline, **kwargs):
    out = pipe(PROMPTS, num_frames=NUM_FRAMES, seed=3, progress=False, schedule=SWITCH, **kwargs)
    return out.latents, out.frames


def short(pipe: Pipeline):
    """Four chunks of batch 2 with a switch: wraps the ring of 1 + 5 frames."""
    out = pipe(PROMPTS, num_frames=29, seed=5, progress=False, schedule=[(2.0, "sky")])
    return out.latents, out.frames


def with_tiny_decoder(pipe: Pipeline) -> Pipeline:
    torch.manual_seed(1)
    pipe.set_decoder(TAEHVDecoder())  # random weights, the same on every rank
    return pipe


def continuation(pipe: Pipeline):
    clip = (torch.arange(9 * 32 * 32 * 3) % 251).to(torch.uint8).view(9, 32, 32, 3)
    out = pipe("a red circle", num_frames=16, video=clip, seed=1, progress=False)
    return out.latents, out.frames


def self_attention_kv_bytes(pipe: Pipeline) -> int:
    cache = pipe._states._free[-1].cache  # the finished stream's cache, pooled
    kv = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if cache.fp8 else [])
    return sum(x.untyped_storage().nbytes() for x in kv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    timeout = datetime.timedelta(seconds=DEAD_RANK_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    torch.set_num_threads(1)
    cp = ContextParallel.create()
    res = {"repr": repr(cp)}
    pipe = tiny_pipe().set_parallel(cp)
    res["stream"] = stream(pipe)
    res["kv_bytes"] = self_attention_kv_bytes(pipe)
    res["seedless"] = pipe("red", num_frames=8, progress=False).latents  # rank 0's seed on every rank
    fp8 = tiny_pipe(kv_dtype=torch.float8_e4m3fn).set_parallel(cp)
    fp8.transformer.use_kernels("torch")  # split: torch norm/RoPE + cache.write, then the ring-attention op
    res["fp8"] = stream(fp8)
    res["fp8_kv_bytes"] = self_attention_kv_bytes(fp8)
    res["taehv"] = short(with_tiny_decoder(tiny_pipe().set_parallel(cp)))
    res["heads40"] = short(Pipeline.from_config("tiny-14b", settings=SETTINGS, parallel="ulysses"))
    shipped = Pipeline.from_pretrained(SHIPPED, parallel="ulysses")  # the API under torchrun's environment
    res["continuation"] = continuation(shipped)
    errors = []
    try:
        WanModel(TEST_CONFIG).set_parallel(cp)  # 3 heads over 2 ranks
    except ValueError as exc:
        errors.append(str(exc))
    try:
        pipe("red", num_frames=8, height=48, width=48, seed=0, progress=False)  # 3x3 = 9 tokens per frame
    except ValueError as exc:
        errors.append(str(exc))
    res["errors"] = errors
    # Rank 1 stops answering (a stuck rank), then dies; rank 0 must get an error each time, never hang: from a
    # group with a short timeout while rank 1 is silent, then from the whole job's group once rank 1 is gone.
    short_timeout = dist.new_group(timeout=datetime.timedelta(seconds=STUCK_TIMEOUT_S))
    if rank == 1:
        torch.save(res, f"{out}/rank{rank}.pt")
        time.sleep(STUCK_TIMEOUT_S + 2)
        os._exit(0)  # dies without a word
    for key, group in (("stuck", short_timeout), ("dead", None)):
        start = time.monotonic()
        try:
            stream(tiny_pipe().set_parallel(ContextParallel(group)))
            res[key] = None
        except ContextParallelError as exc:
            res[key] = (str(exc), time.monotonic() - start)
    torch.save(res, f"{out}/rank{rank}.pt")
    os._exit(0)  # the group has a dead member: no orderly shutdown


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_split_stream_equals_one_process(split):
    """Sinks, ring wrap, a re-base, a prompt switch with re-cache, batch 2: the same latents and frames on every rank
    as on one process."""
    latents, frames = stream(tiny_pipe())
    assert latents.shape[2] > CFG.rope_max_positions  # the stream went past the RoPE table
    for rank in split:
        assert max_diff(rank["stream"][0], latents) <= TOLERANCE
        assert torch.equal(rank["stream"][1], frames)
    assert torch.equal(split[0]["stream"][0], split[1]["stream"][0])  # every rank holds the whole video


def test_split_fp8_cache_and_kernels_equal_one_process(split):
    pipe = tiny_pipe(kv_dtype=torch.float8_e4m3fn)
    pipe.transformer.use_kernels("torch")
    latents, frames = stream(pipe)
    for rank in split:
        assert max_diff(rank["fp8"][0], latents) <= TOLERANCE
        assert torch.equal(rank["fp8"][1], frames)


def test_split_with_the_tiny_decoder_equals_one_process(split):
    latents, frames = short(with_tiny_decoder(tiny_pipe()))
    for rank in split:
        assert max_diff(rank["taehv"][0], latents) <= TOLERANCE
        assert torch.equal(rank["taehv"][1], frames)


def test_split_14b_head_layout_equals_one_process(split):
    """40 heads (Wan2.1-14B's layout, at a tiny width) over 2 ranks, built by from_config(parallel=)."""
    latents, frames = short(Pipeline.from_config("tiny-14b", settings=SETTINGS))
    for rank in split:
        assert max_diff(rank["heads40"][0], latents) <= TOLERANCE
        assert torch.equal(rank["heads40"][1], frames)


@pytest.mark.skipif(not (SHIPPED / "sfpp_pipeline.json").is_file(), reason="the shipped toy model is not here")
def test_split_continuation_through_from_pretrained(split):
    latents, frames = continuation(Pipeline.from_pretrained(SHIPPED))
    for rank in split:
        assert max_diff(rank["continuation"][0], latents) <= TOLERANCE
        assert torch.equal(rank["continuation"][1], frames)


def test_per_rank_cache_memory_is_one_over_n(split):
    for key, options in (("kv_bytes", {}), ("fp8_kv_bytes", {"kv_dtype": torch.float8_e4m3fn})):
        pipe = tiny_pipe(**options)
        stream(pipe)
        assert split[0][key] * 2 == self_attention_kv_bytes(pipe), key
        assert split[1][key] == split[0][key]


def test_a_seed_left_out_is_rank_zeros(split):
    assert torch.equal(split[0]["seedless"], split[1]["seedless"])


def test_bad_degrees_are_clear_errors(split):
    heads, tokens = split[0]["errors"]
    assert "3 heads" in heads and "divisible by 2" in heads
    assert "9 tokens" in tokens and "multiple of 2" in tokens


def test_a_stuck_or_dead_rank_is_an_error_not_a_hang(split):
    assert split[0]["repr"] == "ContextParallel(ulysses, rank 0 of 2)"
    message, seconds = split[0]["stuck"]  # rank 1 alive and silent: the group's timeout
    assert "rank 0 of 2" in message and "failed" in message and "timeout" in message.lower()
    assert STUCK_TIMEOUT_S - 0.5 < seconds < STUCK_TIMEOUT_S + 10
    message, seconds = split[0]["dead"]  # rank 1 gone: as soon as its connection closes
    assert "rank 0 of 2" in message and "failed" in message
    assert seconds < DEAD_RANK_TIMEOUT_S


# ----------------------------------------------------------------------------------------------- one process


def test_parallel_needs_a_launcher_and_a_known_scheme(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        Pipeline.from_config("tiny", parallel="ulysses")
    with pytest.raises(ValueError, match="parallel must be"):
        Pipeline.from_config("tiny", parallel="ring")


def test_cache_heads_must_match_the_model(cfg, model):
    with pytest.raises(ValueError, match="heads must divide"):
        RingKVCache(cfg, batch_size=1, frame_tokens=4, heads=2)
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=4, heads=1)  # a rank's share of 3 ranks, on one device
    with pytest.raises(ValueError, match="holds 1 heads"):
        model.forward_chunk(torch.zeros(1, 16, 1, 4, 4), torch.zeros(1), cache)


def _worker4(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    pipe = Pipeline.from_config("tiny-14b", settings=SETTINGS, parallel="ulysses")  # starts the group itself
    res = {"heads40": short(pipe), "kv_bytes": self_attention_kv_bytes(pipe), "size": pipe.parallel.size}
    torch.save(res, f"{out}/rank{rank}.pt")
    pipe.parallel and torch.distributed.destroy_process_group()


def test_four_ranks_split_14b_heads_like_one_process(tmp_path):
    """40 heads over 4 ranks: the same video, a quarter of the self-attention K/V per rank."""
    torch.multiprocessing.spawn(_worker4, args=(4, free_port(), str(tmp_path)), nprocs=4)
    one = Pipeline.from_config("tiny-14b", settings=SETTINGS)
    latents, frames = short(one)
    for rank in range(4):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["size"] == 4
        assert max_diff(res["heads40"][0], latents) <= TOLERANCE
        assert torch.equal(res["heads40"][1], frames)
        assert res["kv_bytes"] * 4 == self_attention_kv_bytes(one)


def test_the_readme_commands_under_torchrun_write_the_single_process_video(tmp_path):
    """The README's two commands, torchrun generate and the API script under torchrun, each with 2 processes, write
    the one-process mp4 byte for byte (a prompt switch included)."""
    if not (SHIPPED / "sfpp_pipeline.json").is_file():
        pytest.skip("the shipped toy model is not here")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("no torchrun beside this python")
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("torchrun --standalone"))
    script = re.search(r"```python\n(# gen\.py.*?)```", readme, re.S).group(1)
    (tmp_path / "gen.py").write_text(script)
    args = shlex.split(command)[4:]  # -m sfpp generate ... -o out.mp4
    assert args[:3] == ["-m", "sfpp", "generate"] and args[-2:] == ["-o", "out.mp4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(argv: list[str], folder: Path) -> subprocess.CompletedProcess:
        folder.mkdir()
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    # Each in a fresh process: PyAV's x264 writes other bytes for the same frames once a process has encoded before
    # (the first encode of a process is the same file every time).
    run([sys.executable, *args, "--quiet"], tmp_path / "one")
    cli = run([str(torchrun), "--standalone", "--nproc_per_node", "2", *args, "--quiet"], tmp_path / "cli")
    assert "on 2 ranks (ulysses)" in cli.stdout and cli.stdout.count("wrote") == 1  # rank 0 alone writes
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "gen.py")], tmp_path / "api")
    one = (tmp_path / "one" / "out.mp4").read_bytes()
    assert (tmp_path / "cli" / "out.mp4").read_bytes() == one
    assert (tmp_path / "api" / "out.mp4").read_bytes() == one


@pytest.mark.parametrize("config,n,kv_dtype", [("wan2.1-1.3b", 4, torch.float8_e4m3fn), ("wan2.1-14b", 8, None)])
def test_memory_plan_of_a_rank_is_its_cache(config, n, kv_dtype):
    """The memory model of one rank (`memory_plan(parallel=N)`) holds the ring cache a rank builds: H/N heads."""
    from sfpp.models.dit import get_config
    from sfpp.pipeline.memory import memory_plan

    cfg = get_config(config)
    plan = memory_plan(cfg, window=21, kv_dtype=kv_dtype, parallel=n)
    kv = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
    cache = RingKVCache(cfg, batch_size=1, frame_tokens=30 * 52, window=21, dtype=torch.bfloat16, device="meta",
                        heads=cfg.num_heads // n, **kv)  # fmt: skip
    assert plan.kv_cache == pytest.approx(cache.nbytes, rel=1e-3)
    assert plan.kv_cache < memory_plan(cfg, window=21, kv_dtype=kv_dtype).kv_cache / (n - 1)


def _gpu_worker(rank: int, world: int, port: int, out: str) -> None:
    """NCCL on 2 GPUs: each chunk captured as a CUDA graph with the all-to-alls inside, the Triton kernels, fp32."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                            device_id=torch.device("cuda", rank))  # fmt: skip
    res = {}
    if rank == 0:
        one = tiny_pipe(cuda_graph=True).to("cuda:0")
        one.transformer.use_kernels("auto")
        res["one"] = stream(one)[0].cpu()
    dist.barrier()
    pipe = tiny_pipe(cuda_graph=True).to(f"cuda:{rank}").set_parallel(ContextParallel.create())
    pipe.transformer.use_kernels("auto")
    res["split"] = stream(pipe)[0].cpu()
    res["replays"] = pipe._states._free[-1].runner.replays
    torch.save(res, f"{out}/gpu{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_split_on_two_gpus_with_cuda_graphs_equals_one_gpu(tmp_path):
    torch.multiprocessing.spawn(_gpu_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one = torch.load(tmp_path / "gpu0.pt")["one"]
    for rank in range(2):
        res = torch.load(tmp_path / f"gpu{rank}.pt")
        assert res["replays"] > 0  # chunks replayed from graphs holding the collectives
        assert max_diff(res["split"], one) <= 1e-3  # fp32; GPU kernels may pick other tilings per token count


def test_sfpp_memory_shows_one_rank(capsys):
    from sfpp.cli import main

    def kv_column(argv: list[str]) -> float:
        assert main(["memory", "--config", "wan2.1-14b", *argv]) == 0
        full = capsys.readouterr().out.splitlines()[2]  # the "full" row
        return float(full.split("|")[3])

    whole, quarter = kv_column([]), kv_column(["--ranks", "4"])
    assert quarter < whole / 3  # the self-attention K/V is a quarter; the text K/V stays whole
    assert main(["memory", "--ranks", "8"]) == 2  # 8 does not divide 1.3B's 12 heads
    assert "--ranks must divide the 12 heads" in capsys.readouterr().err
