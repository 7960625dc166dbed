"""The mp4 writer and the command line."""

import argparse
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from sfpp import cli
from sfpp.cli import generate as generate_command
from sfpp.cli import main
from sfpp.cli import options as cli_options
from sfpp.cli.options import DEFAULT_MODEL_DIR
from sfpp.pipeline import Pipeline
from sfpp.video import export_to_video


def read_mp4(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return codec, np.stack(frames)


def test_export_writes_h264(tmp_path):
    rng = np.random.default_rng(0)
    video = np.repeat(rng.integers(0, 255, (7, 1, 1, 3), dtype=np.uint8), 32, 1).repeat(48, 2)  # flat colours
    path = export_to_video(torch.from_numpy(video), tmp_path / "sub" / "v.mp4", fps=8)
    codec, frames = read_mp4(path)
    assert codec == "h264" and frames.shape == (7, 32, 48, 3)
    assert np.abs(frames.astype(int) - video.astype(int)).mean() < 6  # lossy, but the same pictures
    float_path = export_to_video(video.astype(np.float32) / 255, tmp_path / "f.mp4")
    assert read_mp4(float_path)[1].shape == (7, 32, 48, 3)


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((2, 5, 8, 8, 3), np.uint8), "one video"),
        (np.zeros((5, 8, 8), np.uint8), r"\[T, H, W, 3\]"),
        (np.zeros((0, 8, 8, 3), np.uint8), r"\[T, H, W, 3\]"),
        (np.zeros((3, 7, 8, 3), np.uint8), "even"),
    ],
)
def test_export_bad_input(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        export_to_video(frames, tmp_path / "x.mp4")


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    args = [
        "generate",
        "-p",
        "a red ball",
        "--seconds",
        "1.5",
        "--seed",
        "3",
        "-o",
        str(out),
        "--quiet",
        "--config",
        "tiny",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "--config tiny builds RANDOM weights" in captured.err
    assert "no trained model is installed" not in captured.err  # there may well be one: --config chose random
    assert "24 frames" in captured.out
    codec, frames = read_mp4(out)
    assert codec == "h264" and frames.shape == (24, 64, 64, 3)


def test_cli_bad_input(tmp_path, capsys):
    assert main(["generate", "-p", "x", "--num-frames", "0", "-o", str(tmp_path / "o.mp4")]) == 2
    assert "num_frames must be a positive integer" in capsys.readouterr().err
    assert main(["generate", "-p", "x", "--model", str(tmp_path / "none")]) == 2
    assert "not an sfpp model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "-p", "x", "--config", "wan9"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "sfpp.cli", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--prompt" in result.stdout and "--seconds" in result.stdout and "example:" in result.stdout


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file(), reason="no shipped default model")
def test_cli_default_model(tmp_path, capsys):
    out = tmp_path / "d.mp4"
    prompt = "a big red circle moving fast over a striped grey background"
    assert main(["generate", "-p", prompt, "--num-frames", "20", "-o", str(out), "--quiet"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    codec, frames = read_mp4(out)
    assert codec == "h264" and frames.shape == (20, 32, 32, 3)


def test_export_fractional_fps(tmp_path):
    """7.5 fps is stored as exactly 15/2 (and NTSC's 30000/1001 exactly), not rounded to an integer rate."""
    video = np.zeros((15, 16, 16, 3), np.uint8)
    for fps, rate in [(7.5, Fraction(15, 2)), (30000 / 1001, Fraction(30000, 1001)), (8, Fraction(8))]:
        path = export_to_video(video, tmp_path / "f.mp4", fps=fps)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == rate and stream.frames == 15
            assert abs(float(container.duration) / 1e6 - 15 / float(rate)) < 0.05


def _interrupt_after(monkeypatch, frames: int) -> None:
    """Make the mp4 encoder raise Ctrl-C after `frames` frames, mid-export."""
    real = av.VideoFrame.from_ndarray
    count = []

    def from_ndarray(*args, **kwargs):
        count.append(1)
        if len(count) > frames:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)


def test_interrupted_export_keeps_the_existing_file_and_leaves_no_partial(tmp_path, monkeypatch):
    video = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    path = export_to_video(video[:4], tmp_path / "v.mp4")
    before = path.read_bytes()
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)
        with pytest.raises(KeyboardInterrupt):
            export_to_video(video, path)
        with pytest.raises(KeyboardInterrupt):
            export_to_video(video, tmp_path / "new.mp4")
    assert path.read_bytes() == before  # the old video, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no truncated new.mp4, no temporary file
    export_to_video(video, path)  # a completed export replaces it
    assert read_mp4(path)[1].shape[0] == 12


def test_output_path_is_checked_before_generating(tmp_path, capsys, monkeypatch):
    """A bad -o fails in well under a second, before the model is even loaded."""
    loaded = []
    monkeypatch.setattr(generate_command, "load_pipeline", lambda *a: loaded.append(1))
    assert main(["generate", "-p", "x", "-o", str(tmp_path / "v.gif")]) == 2
    assert not loaded and "v.gif' ends in '.gif'" in capsys.readouterr().err


def test_random_weight_warnings_say_why(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o.mp4")
    Pipeline.from_config("tiny").save_pretrained(tmp_path / "m")
    assert main(["generate", "-p", "x", "-n", "1", "--quiet", "--model", str(tmp_path / "m"), "-o", out]) == 0
    assert f"the model in {tmp_path / 'm'} has RANDOM weights" in capsys.readouterr().err
    monkeypatch.setattr(cli_options, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    assert main(["generate", "-p", "x", "-n", "1", "--quiet", "-o", out]) == 0
    assert "no trained model is installed" in capsys.readouterr().err


def test_cli_knobs_reach_the_pipeline(tmp_path, capsys, monkeypatch):
    """--dtype/--kv-dtype/--kernels/--compile/--no-cuda-graph/--memory go to from_config; unset ones keep the device's
    defaults; and they generate."""
    seen = {}
    real = Pipeline.from_config
    monkeypatch.setattr(Pipeline, "from_config", lambda name, **kw: seen.update(kw) or real(name, **kw))
    args = ["generate", "-p", "x", "--config", "tiny", "-n", "5", "--quiet", "-o", str(tmp_path / "o.mp4")]
    assert main([*args, "--dtype", "bfloat16", "--kv-dtype", "bf16", "--kernels", "torch", "--no-cuda-graph"]) == 0
    assert seen == {"device": torch.device("cpu"), "compile": False, "dtype": torch.bfloat16, "kernels": "torch",
                    "cuda_graph": False, "kv_dtype": torch.bfloat16}  # fmt: skip
    seen.clear()
    assert main([*args, "--kv-dtype", "fp8", "--memory", "low"]) == 0
    assert seen == {"device": torch.device("cpu"), "compile": False, "kv_dtype": torch.float8_e4m3fn, "memory": "low"}
    assert read_mp4(tmp_path / "o.mp4")[1].shape[0] == 5


def test_threads_policy_in_the_pipeline_for_the_api_and_the_cli(tmp_path, monkeypatch):
    """One CPU thread while a pipeline works by default (measured faster, bench/results/bench_threads-*.json), for
    the Python API and the CLI alike; `cpu_threads=` / --threads to choose, None for torch's own; the caller's
    count holds in between chunks and afterwards."""
    from sfpp.engine.graph import ChunkRunner

    seen = []
    real_call = ChunkRunner.__call__
    record = lambda self, *a: seen.append(torch.get_num_threads()) or real_call(self, *a)  # noqa: E731
    monkeypatch.setattr(ChunkRunner, "__call__", record)
    before = torch.get_num_threads()
    stream = Pipeline.from_config("tiny").stream("x", num_frames=4, seed=0, progress=False)
    for _ in stream:
        assert torch.get_num_threads() == before  # the caller's, between chunks
    assert seen and set(seen) == {cli_options.DEFAULT_CPU_THREADS}
    seen.clear()
    list(Pipeline.from_config("tiny", cpu_threads=None).stream("x", num_frames=2, seed=0, progress=False))
    assert set(seen) == {before}
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        Pipeline.from_config("tiny", cpu_threads=0)
    seen.clear()
    args = ["generate", "-p", "x", "--config", "tiny", "-n", "1", "--quiet", "-o", str(tmp_path / "o.mp4")]
    assert main(args) == 0 and set(seen) == {cli_options.DEFAULT_CPU_THREADS}
    seen.clear()
    assert main([*args, "--threads", "2"]) == 0 and set(seen) == {2} and torch.get_num_threads() == before
    assert main([*args, "--threads", "0"]) == 2


def _help_of_every_option(p: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.help for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}


def test_every_option_has_help_and_the_size_rule_is_true():
    from sfpp.benchmark.e2e import parser as bench_parser

    generate = cli._parser()._subparsers._group_actions[0].choices["generate"]
    for p in (generate, bench_parser()):
        missing = [dest for dest, text in _help_of_every_option(p).items() if not text]
        assert not missing, f"{p.prog}: options without help: {missing}"
    help_text = _help_of_every_option(generate)["height"]
    assert "8 for the shipped model" in help_text and "16 for Wan2.1" in help_text
    if (DEFAULT_MODEL_DIR / "sfpp_pipeline.json").is_file():
        pipe = Pipeline.from_pretrained("default")
        assert pipe.decoder.spatial_factor * pipe.transformer.cfg.patch_size[1] == 8
        assert pipe._plan(1, None, 40, 24)[2:] == (10, 6)  # 40x24: multiples of 8, not of 16
    tiny = Pipeline.from_config("tiny")
    assert tiny.decoder.spatial_factor * tiny.transformer.cfg.patch_size[1] == 16
