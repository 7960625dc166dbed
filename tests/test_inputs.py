"""Every kind of input a user can give, answered with one clear line: a table of (input, error type or exit status,
words the message must contain) for the command line and the Python API, run in-process on the tiny config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sfpp.cli import main
from sfpp.models.checkpoint import CheckpointError
from sfpp.pipeline import Pipeline, check_device, device_defaults
from sfpp.video import export_to_video

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA, reason="the rule under test is about a machine without CUDA")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> Path:
    """A saved tiny model, and broken copies of its JSON: a missing top-level key, a missing nested key, not JSON."""
    root = tmp_path_factory.mktemp("models")
    Pipeline.from_config("tiny").save_pretrained(root / "good")
    meta = json.loads((root / "good" / "sfpp_pipeline.json").read_text())
    broken = {
        "no_decoder": {k: v for k, v in meta.items() if k != "decoder"},
        "no_text_config": {**meta, "text_encoder": {"type": "byte"}},
        "bad_settings": {**meta, "settings": {**meta["settings"], "frames": 3}},
    }
    for name, m in broken.items():
        (root / name).mkdir()
        for f in (root / "good").iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
        (root / name / "sfpp_pipeline.json").write_text(json.dumps(m))
    (root / "not_json").mkdir()
    (root / "not_json" / "sfpp_pipeline.json").write_text("{ transformer: ")
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, --version and its own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


UNWRITABLE = "/sys/sfpp.mp4"  # sysfs refuses new files even to root, where chmod-based tests would pass

# (arguments after `sfpp generate -p x` (which come after a tiny config, -n 1 and -o {tmp}/out.mp4), exit status,
# words of the one-line error)
GENERATE_CASES = [
    (["--seconds", "0"], 2, "seconds must be positive, got 0.0"),
    (["--seconds", "-2"], 2, "seconds must be positive"),
    (["--seconds", "inf"], 2, "seconds must be finite, got inf"),
    (["--seconds", "nan"], 2, "seconds must be positive, got nan"),
    (["--seconds", "ten"], 2, "invalid float value: 'ten'"),
    (["--num-frames", "0"], 2, "num_frames must be a positive integer, got 0"),
    (["--num-frames", "-5"], 2, "num_frames must be a positive integer"),
    (["--num-frames", "2.5"], 2, "invalid int value: '2.5'"),
    (["--num-frames", "4", "--seconds", "1"], 2, "not allowed with argument"),
    (["--height", "36"], 2, "multiples of 16, got 36x64"),
    (["--width", "-16"], 2, "multiples of 16"),
    (["--height", "thirty"], 2, "invalid int value: 'thirty'"),
    (["--window", "0"], 2, "window (0) must hold at least one chunk"),
    (["--sink", "-1"], 2, "invalid stream settings"),
    (["--threads", "0"], 2, "--threads must be at least 1"),
    (["--seed", "x"], 2, "invalid int value: 'x'"),
    (["--device", "tpu9"], 2, "unknown device 'tpu9'"),
    (["--device", "cuda:99"], 2, "cuda:99"),
    pytest.param(["--device", "cuda"], 2, "no CUDA device is available", marks=cpu_only),
    pytest.param(["--cuda-graph"], 2, "--cuda-graph needs a CUDA device", marks=cpu_only),
    pytest.param(["--kernels", "cuda"], 2, "backend 'cuda'", marks=cpu_only),
    pytest.param(["--kv-dtype", "bf16"], 2, "--kv-dtype bf16 needs --dtype bfloat16", marks=cpu_only),
    pytest.param(["--compile", "--kv-dtype", "fp8"], 2, "cannot compile the fp8 KV cache", marks=cpu_only),
    (["--kernels", "fast"], 2, "invalid choice: 'fast'"),
    (["--dtype", "float8"], 2, "invalid choice: 'float8'"),
    (["--config", "wan9"], 2, "invalid choice: 'wan9'"),
    # the output path: checked before generating, named in the error
    (["-o", "{tmp}"], 2, "is a folder"),
    (["-o", "{tmp}/clip.gif"], 2, "clip.gif' ends in '.gif'"),
    (["-o", "{tmp}/clip"], 2, "clip' has no extension"),
    (["-o", "{tmp}/file.txt/clip.mp4"], 2, "file.txt is a file, not a folder"),
    pytest.param(
        ["-o", UNWRITABLE],
        2,
        "cannot write '/sys/sfpp.mp4'",
        marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="no sysfs"),
    ),
]


@pytest.mark.parametrize("args,code,words", GENERATE_CASES)
def test_generate_bad_input(tmp_path, capsys, monkeypatch, args, code, words):
    """Each bad input: the exit status, one line on stderr with the words, no traceback, no video generated, nothing
    written."""
    (tmp_path / "file.txt").write_text("")
    generated = []
    original = Pipeline.stream
    monkeypatch.setattr(Pipeline, "stream", lambda *a, **k: generated.append(1) or original(*a, **k))
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["generate", "-p", "x", "--config", "tiny", "-n", "1", "--quiet", "-o", str(tmp_path / "out.mp4"), *args]
    if "--num-frames" in args or "--seconds" in args:
        argv.remove("-n"), argv.remove("1")
    got, out, err = run_cli(argv, capsys)
    assert got == code, err
    assert words in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "RANDOM weights" not in line]  # --config's note
    assert len(lines) == 1 and lines[0].startswith("sfpp"), err
    assert not (tmp_path / "out.mp4").exists()
    if "-o" in args:
        assert not generated  # a bad output path costs no generation


@pytest.mark.parametrize(
    "key,words",
    [
        ("missing", "not an sfpp model directory"),
        ("no_decoder", "sfpp_pipeline.json has no 'decoder' key"),
        ("no_text_config", "sfpp_pipeline.json: the 'text_encoder' entry has no 'config' key"),
        ("bad_settings", "sfpp_pipeline.json: the 'settings' entry does not fit"),
        ("not_json", "could not read"),
    ],
)
def test_generate_bad_model_directory(model_dirs, tmp_path, capsys, key, words):
    argv = [
        "generate",
        "-p",
        "x",
        "-n",
        "1",
        "--quiet",
        "--model",
        str(model_dirs / key),
        "-o",
        str(tmp_path / "o.mp4"),
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert str(model_dirs / key) in err  # the file is named


@pytest.mark.parametrize(
    "argv,code,words",
    [
        (["bench", "--modes", "turbo"], 2, "unknown mode 'turbo'"),
        (["bench", "--kv-dtypes", "int4"], 2, "unknown KV dtype 'int4'"),
        (["bench", "--height", "40"], 2, "multiples of 16"),
        (["bench", "--device", "tpu9"], 2, "unknown device 'tpu9'"),
        (["bench", "--kernels", "fast"], 2, "invalid choice: 'fast'"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["generate"], 2, "required: -p/--prompt"),
        ([], 2, "required: command"),
    ],
)
def test_cli_usage_errors(capsys, argv, code, words):
    got, _, err = run_cli(argv, capsys)
    assert got == code and words in err and "Traceback" not in err, err


def test_version(capsys):
    from sfpp import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"sfpp {__version__}"


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Pipeline, "stream", interrupted)
    code, _, err = run_cli(["generate", "-p", "x", "--config", "tiny", "-o", str(tmp_path / "o.mp4")], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "sfpp: interrupted"
    assert "Traceback" not in err and not (tmp_path / "o.mp4").exists()


# --- the Python API


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny")


FRAMES = np.zeros((3, 16, 16, 3), np.uint8)

# (call on the tiny pipeline, error type, words)
API_CASES = [
    (lambda p: p("x", seconds=True), TypeError, "seconds must be a number, got True"),
    (lambda p: p("x", seconds="ten"), TypeError, "seconds must be a number, got 'ten' (str)"),
    (lambda p: p("x", seconds=float("inf")), ValueError, "seconds must be finite"),
    (lambda p: p("x", seconds=float("nan")), ValueError, "seconds must be positive"),
    (lambda p: p("x", seconds=0), ValueError, "seconds must be positive"),
    (lambda p: p("x", seconds=torch.tensor(1.0)), TypeError, "seconds must be a number"),
    (lambda p: p("x", num_frames=True), TypeError, "num_frames must be an integer, got True"),
    (lambda p: p("x", num_frames="8"), TypeError, "num_frames must be an integer, got '8' (str)"),
    (lambda p: p("x", num_frames=8.0), ValueError, "num_frames must be a positive integer, got 8.0"),
    (lambda p: p("x", num_frames=np.int64(0)), ValueError, "num_frames must be a positive integer, got 0"),
    (lambda p: p("x", num_frames=[8]), TypeError, "num_frames must be an integer"),
    (lambda p: p("x", num_frames=1, height="32"), TypeError, "height must be an integer, got '32' (str)"),
    (lambda p: p("x", num_frames=1, width=32.0), ValueError, "width must be a positive integer, got 32.0"),
    (lambda p: p("x", num_frames=1, height=False), TypeError, "height must be an integer, got False"),
    (lambda p: p("x", num_frames=1, height=40), ValueError, "multiples of 16, got 40x64"),
    (lambda p: p("x", num_frames=1, generator=0), TypeError, "generator must be a torch.Generator, got 0"),
    (lambda p: p("x", num_frames=1, generator=7, seed=None), TypeError, "for an integer seed pass seed="),
    (lambda p: p("x", num_frames=1, seed="1"), TypeError, "seed must be an integer, got '1'"),
    (lambda p: p("x", num_frames=1, seed=1.5), TypeError, "seed must be an integer"),
    (lambda p: p("x", num_frames=1, seed=1, generator=torch.Generator()), ValueError, "not both"),
    (lambda p: p(None, num_frames=1), TypeError, "prompt must be a string"),
    (lambda p: p(b"bytes", num_frames=1), TypeError, "prompt must be a string"),
    (lambda p: p.to("tpu9"), ValueError, "unknown device 'tpu9'"),
    (lambda p: export_to_video(FRAMES, "/tmp/sfpp-x.gif"), ValueError, "'/tmp/sfpp-x.gif' ends in '.gif'"),
    (lambda p: export_to_video(FRAMES, "/tmp"), ValueError, "'/tmp' is a folder"),
    (lambda p: export_to_video(FRAMES, "/tmp/sfpp-x.mp4", fps=0), ValueError, "fps must be positive and finite"),
    (lambda p: export_to_video(FRAMES, "/tmp/sfpp-x.mp4", fps=float("inf")), ValueError, "positive and finite"),
    (lambda p: export_to_video(FRAMES, "/tmp/sfpp-x.mp4", fps="8"), TypeError, "fps must be a number, got '8'"),
    (lambda p: export_to_video(FRAMES, "/tmp/sfpp-x.mp4", fps=True), TypeError, "fps must be a number, got True"),
    (lambda p: Pipeline.from_config("tiny", device="tpu9"), ValueError, "unknown device 'tpu9'"),
    (lambda p: Pipeline.from_config("tiny", kernels="fast"), ValueError, "kernels must be one of"),
    (lambda p: Pipeline.from_config("tiny", dtype="float32"), ValueError, "dtype must be one of"),
    (lambda p: Pipeline.from_config("tiny", kv_dtype="fp8"), ValueError, "kv_dtype must be one of"),
    (lambda p: Pipeline.from_config("wan9"), ValueError, "unknown model config 'wan9'"),
    (
        lambda p: Pipeline.from_pretrained("no/such/dir"),
        FileNotFoundError,
        "name of a shipped model: ['default', 'self-forcing', 'self-forcing++-grpo']",
    ),
    pytest.param(lambda p: Pipeline.from_config("tiny", device="cuda"), ValueError, "no CUDA device", marks=cpu_only),
    pytest.param(
        lambda p: Pipeline.from_config("tiny", kv_dtype=torch.bfloat16),
        ValueError,
        "kv_dtype torch.bfloat16 needs dtype=torch.bfloat16",
        marks=cpu_only,
    ),
    pytest.param(
        lambda p: Pipeline.from_config("tiny", compile=True, kv_dtype=torch.float8_e4m3fn),
        ValueError,
        "cannot compile the fp8 KV cache for a CPU",
        marks=cpu_only,
    ),
]


@pytest.mark.parametrize("call,error,words", API_CASES)
def test_api_bad_input(pipe, call, error, words):
    with pytest.raises(error) as info:
        call(pipe)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_api_model_json_errors_name_file_and_key(model_dirs):
    with pytest.raises(CheckpointError, match=r"no_decoder/sfpp_pipeline.json has no 'decoder' key"):
        Pipeline.from_pretrained(model_dirs / "no_decoder")
    with pytest.raises(CheckpointError, match=r"'text_encoder' entry has no 'config' key"):
        Pipeline.from_pretrained(model_dirs / "no_text_config")


def test_api_accepts_numpy_numbers(pipe):
    """numpy integers are lengths and sizes; numpy floats are seconds."""
    out = pipe("x", num_frames=np.int64(8), height=np.int32(32), seed=np.int64(1), progress=False)
    assert out.frames.shape[:3] == (1, 8, 32)
    assert pipe("x", seconds=np.float64(0.5), seed=1, progress=False).frames.shape[1] == 8  # 16 fps


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        check_device("gpu")


def test_device_defaults_are_the_fast_path_on_cuda_only():
    """On CUDA: bf16, the kernels by auto dispatch, CUDA graphs; on a CPU: today's fp32 torch path, eager."""
    assert device_defaults(torch.device("cuda")) == {"dtype": torch.bfloat16, "kernels": "auto", "cuda_graph": True}
    assert device_defaults(torch.device("cpu")) == {"dtype": torch.float32, "kernels": "none", "cuda_graph": False}
    pipe = Pipeline.from_config("tiny")
    assert pipe.transformer.dtype == torch.float32 and pipe.transformer.kernels is None
    assert pipe.runner_options["cuda_graph"] is False
    chosen = Pipeline.from_config("tiny", kernels="torch", dtype=torch.bfloat16)
    assert chosen.transformer.kernels == "torch" and chosen.transformer.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_defaults_on_cuda():
    pipe = Pipeline.from_config("tiny", device="cuda")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.transformer.kernels == "auto"
    assert pipe.runner_options["cuda_graph"] is True
    assert pipe("x", num_frames=9, seed=0, progress=False).frames.shape[1] == 9


def test_shipped_model_by_name_from_any_directory(tmp_path, monkeypatch):
    from sfpp.pipeline import SHIPPED_MODELS

    if not (SHIPPED_MODELS["default"] / "sfpp_pipeline.json").is_file():
        pytest.skip("no shipped default model")
    monkeypatch.chdir(tmp_path)
    by_name = Pipeline.from_pretrained("default")
    assert not by_name.random_weights and by_name.settings.height == 32
    by_path = Pipeline.from_pretrained(SHIPPED_MODELS["default"])
    a = by_name("a big red circle", num_frames=5, seed=0, progress=False).frames
    assert torch.equal(a, by_path("a big red circle", num_frames=5, seed=0, progress=False).frames)
