"""The mp4 writer and the command line."""

import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from sfpp.cli import DEFAULT_MODEL_DIR, main
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
    assert "RANDOM weights" in captured.err
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
