"""The TAEHV tiny decoder: taew2_1's published parameter names and shapes, flashdreams' independent TAEHV on the same
random weights (a test-only oracle, as diffusers is for the Wan VAE), streaming equal to whole-video decoding, and
the pipeline and CLI around it."""

import pytest
import torch

from sfpp import Pipeline, StreamSettings
from sfpp.cli import main
from sfpp.cli.options import DEFAULT_MODEL_DIR
from sfpp.models.checkpoint import CheckpointError
from sfpp.models.taehv import TAEHVDecoder
from sfpp.video import num_latent_frames


def _memory_block(i: int, dim: int) -> dict:
    convs = {0: (dim, 2 * dim, 3, 3), 2: (dim, dim, 3, 3), 4: (dim, dim, 3, 3)}
    out = {f"decoder.{i}.conv.{j}.weight": shape for j, shape in convs.items()}
    return out | {f"decoder.{i}.conv.{j}.bias": (dim,) for j in convs}


# taew2_1's decoder tensors as published (madebyollin/taehv, taehv.py): Clamp, conv 16->256, ReLU, then per stage
# three MemBlocks, Upsample, TGrow (a bias-free 1x1 conv to stride x channels) and a bias-free conv to the next width,
# then ReLU and conv 64->3. Written out here rather than derived from our module, so a renamed layer fails.
PUBLISHED = {
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.1.bias": (256,),
    **_memory_block(3, 256),
    **_memory_block(4, 256),
    **_memory_block(5, 256),
    "decoder.7.conv.weight": (256, 256, 1, 1),
    "decoder.8.weight": (128, 256, 3, 3),
    **_memory_block(9, 128),
    **_memory_block(10, 128),
    **_memory_block(11, 128),
    "decoder.13.conv.weight": (256, 128, 1, 1),
    "decoder.14.weight": (64, 128, 3, 3),
    **_memory_block(15, 64),
    **_memory_block(16, 64),
    **_memory_block(17, 64),
    "decoder.19.conv.weight": (128, 64, 1, 1),
    "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3),
    "decoder.22.bias": (3,),
}
# Two of the encoder's tensors, which the distributed file also holds and the decoder must skip.
ENCODER = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,)}


def random_taew2_1(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out as taew2_1.pth with random weights scaled so the output spans [0, 1] rather than
    saturating (weights N(0, 1/fan_in), biases N(0, 0.1), the last bias 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in (PUBLISHED | ENCODER).items():
        std = (1 / (shape[1] * shape[2] * shape[3])) ** 0.5 if len(shape) == 4 else 0.1
        sd[key] = std * torch.randn(shape, generator=gen)
    sd["decoder.22.bias"] += 0.5
    return sd


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save(random_taew2_1(), path)
    return path


@pytest.fixture(scope="module")
def tiny(weights_file) -> TAEHVDecoder:
    return TAEHVDecoder.from_file(weights_file)


def latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_parameters_are_taew2_1s():
    ours = {k: tuple(v.shape) for k, v in TAEHVDecoder().state_dict().items()}
    assert ours == PUBLISHED


def test_load_distributed_files(tiny, weights_file, tmp_path):
    from safetensors.torch import save_file

    sd = random_taew2_1()
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "taew2_1.safetensors"))  # an fp16 file
    half = TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.state_dict()["decoder.1.weight"], sd["decoder.1.weight"].half().float())
    torch.testing.assert_close(tiny.state_dict()["decoder.22.bias"], sd["decoder.22.bias"])
    # save() writes what from_meta() reads: the same decoder.
    tiny.save(tmp_path)
    again = TAEHVDecoder.from_meta(tiny.to_meta(), tmp_path)
    z = latents(1, 16, 2, 2, 3)
    torch.testing.assert_close(again.decode(z), tiny.decode(z), rtol=0, atol=0)


def test_bad_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny decoder weights not found"):
        TAEHVDecoder.from_file(tmp_path / "nothing.pth")
    sd = random_taew2_1()
    del sd["decoder.9.conv.2.weight"]
    sd["decoder.13.conv.weight"] = torch.zeros(128, 128, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(decoder\.9\.conv\.2\.weight\).*decoder\.13\.conv"):
        TAEHVDecoder.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="put taew2_1.safetensors or taew2_1.pth in"):
        TAEHVDecoder.weights_in(tmp_path)


@torch.no_grad()
def test_matches_flashdreams(tiny, weights_file):
    impl = pytest.importorskip(
        "flashdreams.recipes.taehv.impl", reason="flashdreams (the test-only TAEHV oracle) is not installed"
    )
    oracle = impl.TAEHV(checkpoint_path=str(weights_file), use_cuda_graph=False)
    # It loads with strict=False: check it took every tensor of ours under its own names, and nothing else.
    theirs = {k.replace("decoder.blocks.", "decoder."): v for k, v in oracle.state_dict().items()}
    assert theirs.keys() == tiny.state_dict().keys() and not any(v.is_meta for v in theirs.values())

    z = latents(2, 16, 4, 3, 5)  # [B, C, F, h, w]; flashdreams takes [B, F, C, h, w] and gives [-1, 1]
    ours = tiny.decode(z)
    assert ours.shape == (2, 3, 13, 24, 40)
    assert ((ours > -1) & (ours < 1)).float().mean() > 0.3  # most pixels unclamped: the comparison means something
    cache = oracle.prepare_cache()
    ref = torch.cat([oracle.decode(c.transpose(1, 2), cache=cache) for c in z.split([1, 3], dim=2)], dim=1)
    torch.testing.assert_close(ours, ref.mul(2).sub(1).transpose(1, 2), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_streaming_equals_whole_video(tiny):
    z = latents(2, 16, 7, 2, 3, seed=2)
    whole = tiny.decode(z)
    assert whole.shape == (2, 3, 1 + 4 * 6, 16, 24)
    for sizes in ([3, 3, 1], [1, 2, 4], [2, 5]):
        stream = tiny.stream()
        parts = [stream.decode_pixels(chunk) for chunk in z.split(sizes, dim=2)]
        # Frames as soon as a chunk is in, as many as the Wan VAE gives and the pipeline plans with.
        assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * s for s in sizes[1:]]
        torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-5)
    frames = tiny.stream().decode(z[:, :, :3])
    assert frames.shape == (2, 9, 16, 24, 3) and frames.dtype == torch.uint8
    expected = whole[:, :, :9].add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (frames.int() - expected.int()).abs().max() <= 1
    with pytest.raises(ValueError, match=r"latents must be \[batch, 16, frames >= 1"):
        tiny.stream().decode(torch.randn(1, 8, 2, 2, 2))


def test_pipeline_set_decoder_and_round_trip(tiny, weights_file, tmp_path):
    pipe = Pipeline.from_config("tiny", settings=StreamSettings(height=16, width=16))  # Wan-shaped random latents
    pipe.set_decoder(tiny)
    num_frames = 10
    chunks = list(pipe.stream("a ball", num_frames=num_frames, seed=0, progress=False))
    assert [c.shape[1] for c in chunks] == [9, 1]  # 3 latent frames -> 9, then 4 of which 1 is asked for
    assert num_latent_frames(num_frames, pipe.decoder.temporal_factor) == 4
    assert chunks[0].shape == (1, 9, 16, 16, 3)

    pipe.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "taew2_1.safetensors").is_file()
    loaded = Pipeline.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.decoder, TAEHVDecoder)
    again = list(loaded.stream("a ball", num_frames=num_frames, seed=0, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(chunks, again, strict=True))

    # decoder="tiny" swaps a saved model's decoder, with the weights file in the directory or named.
    Pipeline.from_config("tiny").save_pretrained(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="put taew2_1.safetensors or taew2_1.pth in"):
        Pipeline.from_pretrained(tmp_path / "p", decoder="tiny")
    assert isinstance(Pipeline.from_pretrained(tmp_path / "p", decoder="tiny", decoder_path=weights_file).decoder,
                      TAEHVDecoder)  # fmt: skip
    (tmp_path / "p" / "taew2_1.pth").write_bytes(weights_file.read_bytes())
    assert isinstance(Pipeline.from_pretrained(tmp_path / "p", decoder="tiny").decoder, TAEHVDecoder)
    with pytest.raises(ValueError, match="decoder must be 'tiny' or None"):
        Pipeline.from_pretrained(tmp_path / "p", decoder="small")


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file(), reason="no shipped default model")
def test_not_for_other_latents(tiny):
    # The shipped toy model's latents have 16 channels too, but are a patch-PCA code at 4x spatial, 1x temporal.
    with pytest.raises(ValueError, match=r"16 channels, 8x spatial, 4x temporal.*'patch-pca'.*4x spatial, 1x"):
        Pipeline.from_pretrained(DEFAULT_MODEL_DIR, decoder="tiny")  # said before asking for weights
    with pytest.raises(ValueError, match="'patch-pca'"):
        Pipeline.from_pretrained(DEFAULT_MODEL_DIR).set_decoder(tiny)


def test_cli(weights_file, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    base = ["generate", "-p", "a ball", "--num-frames", "5", "-o", str(out), "--quiet", "--height", "32"]
    base += ["--width", "32", "--config", "tiny", "--decoder", "tiny"]
    assert main([*base, "--decoder-weights", str(weights_file)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    assert main(base) == 2
    assert "--decoder tiny with --config needs --decoder-weights" in capsys.readouterr().err
    assert main([*base, "--decoder-weights", str(tmp_path / "missing.pth")]) == 2
    assert "tiny decoder weights not found" in capsys.readouterr().err
    assert main(["generate", "-p", "x", "--decoder-weights", str(weights_file), "-o", str(out)]) == 2
    assert "add --decoder tiny" in capsys.readouterr().err
    # sfpp serve loads its pipeline the same way (it fails here before serving anything).
    assert main(["serve", "--config", "tiny", "--decoder", "tiny"]) == 2
    assert "--decoder tiny with --config needs --decoder-weights" in capsys.readouterr().err
    if (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file():
        for command in (["generate", "-p", "x", "-o", str(out)], ["serve"]):
            assert main([*command, "--decoder", "tiny"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("sfpp: error: TAEHVDecoder decodes latents of 16 channels") and err.count("\n") == 1


def test_bench_decoders_runs_on_cpu(tmp_path):
    """The decoder benchmark at a tiny size: both decoders timed in one run, saved with provenance."""
    import json

    from bench.bench_decoders import main as bench

    results = bench(["--height", "2", "--width", "2", "--chunks", "1", "--out-dir", str(tmp_path)])
    rows = {r["decoder"]: r for r in results["decoders"]}
    assert {r["frames_per_chunk"] for r in rows.values()} == {12}  # a steady-state chunk of 3
    assert rows["tiny"]["decoder_params"] == sum(int(torch.tensor(s).prod()) for s in PUBLISHED.values())
    record = json.loads(next(tmp_path.glob("bench_decoders-cpu-*.json")).read_text())
    assert record["wan_vae_over_tiny"] > 0 and {"device", "commit", "date", "command"} <= record.keys()
