"""Every command that writes into the repository says so in its --help, and no other command does: each runnable
script of train/ and bench/ and each `sfpp` command is in one of the two tables below (a new script must be added to
one), and its help is checked against it. What the writers do is tested beside them (tests/test_ship.py, the
benchmark tests); conftest.py checks that the whole test session leaves the checkout as it was."""

import importlib
import re
from pathlib import Path

import pytest
import torch

from bench import common
from sfpp.benchmark import record

ROOT = Path(__file__).resolve().parents[1]

# module (as `python -m` runs it) -> the repository paths its help must name
WRITERS = {
    "train": ["sfpp/assets", "README"],
    "train.evaluate": ["sfpp/assets", "README"],
    "bench.bench_adaln": ["bench/results", "sfpp/engine/dispatch_table.json"],
    "bench.bench_cache_write": ["bench/results", "sfpp/engine/dispatch_table.json"],
    "bench.bench_ring_attention": ["bench/results", "sfpp/engine/dispatch_table.json"],
    "bench.bench_decoders": ["bench/results"],
    "bench.bench_memory": ["bench/results"],
    "bench.bench_flashdreams": ["bench/results"],
    "bench.bench_serve": ["bench/results"],
    "bench.bench_api_cli": ["bench/results"],
    "bench.bench_serve_load": ["bench/results"],
    "bench.bench_threads": ["bench/results"],
    "bench.chunk_step": ["bench/results"],
    "bench.campaign": ["sfpp/engine/dispatch_table.json"],
    "bench.report": ["README.md"],
    "bench.parallel_plan": ["bench/results"],
}
# these write only where they are told (--out, -o, --out-dir; `sfpp bench`: the current directory), or nothing
OTHERS = ["train.endless", "train.steering", "train.estimate", "train.fp8_horizon", "train.teacher_curve",
          "train.budget", "bench.aot", "bench", "bench.fp8_error", "sfpp generate", "sfpp serve", "sfpp bench",
          "sfpp memory"]  # fmt: skip
SAYS_SO = "writes into the repository"


def runnable() -> set[str]:
    found = set()
    for folder in ("train", "bench"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name == "__main__.py":
                found.add(folder)
            elif re.search(r'^if __name__ == "__main__":', path.read_text(), re.M):
                found.add(f"{folder}.{path.stem}")
    return found


def help_text(command: str, capsys) -> str:
    if command.startswith("sfpp "):
        from sfpp.cli import main

        argv, run = [command.split()[1], "--help"], main
    elif command == "bench":  # bench/__main__.py hands its arguments to the suite of `sfpp bench`
        from sfpp.benchmark import e2e

        argv, run = ["--help"], e2e.main
    else:
        module = importlib.import_module("train.__main__" if command == "train" else command)
        argv, run = ["--help"], module.main
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split()).lower()


def test_every_command_is_classified():
    assert runnable() == {c for c in [*WRITERS, *OTHERS] if not c.startswith("sfpp ")}


@pytest.mark.parametrize("command", [*WRITERS, *OTHERS])
def test_help_says_what_it_writes_into_the_repository(command, capsys):
    text = help_text(command, capsys)
    if command in WRITERS:
        assert SAYS_SO in text, f"{command} --help does not say it writes into the repository"
        for path in WRITERS[command]:
            assert path.lower() in text, f"{command} --help does not name {path}"
    else:
        assert SAYS_SO not in text, f"{command} --help claims to write into the repository"


@pytest.mark.parametrize("command", ["train.endless", "train.steering"])
def test_measurements_need_an_out_folder(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(command).main([])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_results_go_to_bench_results_by_default_and_never_over_older_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    device = torch.device("cpu")
    monkeypatch.setattr(record, "now", lambda: "2026-01-01T00:00:00+00:00")  # two runs in the same second
    first, second = common.save("x", device, {"n": 1}), common.save("x", device, {"n": 2})
    assert first.parent == second.parent == tmp_path / "results" and first != second
    assert '"n": 1' in first.read_text() and '"n": 2' in second.read_text()
    elsewhere = common.save("x", device, {}, out_dir=tmp_path / "mine")
    assert elsewhere.parent == tmp_path / "mine"
