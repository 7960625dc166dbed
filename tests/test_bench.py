"""The benchmark suite: the Self-Forcing baseline computes what sfpp computes, and `sfpp bench` runs on a CPU."""

import json

import pytest
import torch
from conftest import TEST_CONFIG, randomize_

from sfpp.benchmark.baseline import SelfForcingBaseline
from sfpp.engine.cache import RingKVCache
from sfpp.engine.graph import ChunkRunner
from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.dit import WanModel


@pytest.mark.parametrize("sink", [0, 1])
@torch.no_grad()
def test_baseline_equals_sfpp(sink):
    """Same weights and noise: the rolled-by-copy cache and float64 RoPE give the ring cache's video, past several
    evictions (window 4 frames, chunks of 2), so the speed comparison is like for like."""
    torch.manual_seed(0)
    model = randomize_(WanModel(TEST_CONFIG), scale=0.1).eval()
    context = torch.randn(1, 7, TEST_CONFIG.text_dim)  # shorter than text_len: both pad with zeros
    schedule = FlowMatchSchedule(context_noise=20)
    cache = RingKVCache(TEST_CONFIG, batch_size=1, frame_tokens=6, window=4, sink=sink)
    cache.set_text(model.text_kv(context))
    ours = ChunkRunner(model, cache, schedule)
    base = SelfForcingBaseline(model, schedule, batch_size=1, frame_tokens=6, window=4, sink=sink)
    base.set_text(context)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        noises = ours.draw_noise((1, 16, 2, 4, 6), gen)
        torch.testing.assert_close(base(noises), ours(noises), rtol=1e-4, atol=1e-4)


def _help_smoke_command() -> list[str]:
    """The CPU smoke command that `sfpp bench --help` prints, as arguments after `sfpp`."""
    from sfpp.benchmark import e2e

    doc = e2e.__doc__.replace("\\\n", " ")
    (line,) = [line for line in doc.splitlines() if "# CPU smoke" in line]
    return line.split("#")[0].split()[1:]


def test_help_cpu_smoke_command_passes(tmp_path, capsys):
    """The command `sfpp bench --help` offers for a CPU runs every variant of the device's defaults or skips it with a
    reason, the baseline in the same run, exit status 0, JSON with provenance."""
    from sfpp.cli import main

    assert main([*_help_smoke_command(), "--profile", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| variant | DiT FPS | e2e FPS |" in out and "x the baseline end to end" in out
    (path,) = tmp_path.glob("e2e-*.json")
    record = json.loads(path.read_text())
    assert {"device", "commit", "date", "command", "torch"} <= set(record)
    ran = [r for r in record["results"] if "skipped" not in r]
    assert ran[-1]["variant"] == "baseline" and not any("error" in r for r in record["results"])
    for r in ran:
        assert r["dit_fps"] > 0 and r["e2e_fps"] > 0 and r["first_chunk_s"] > 0
    assert len(ran[0]["dit_ms_per_chunk"]) == len(ran[-1]["dit_ms_per_chunk"]) == 4  # the long run: 8 frames
    assert len(ran[1]["dit_ms_per_chunk"]) == 2 + 1  # ring fill + 1 timed chunk
    assert record["summary"]["e2e_speedup_vs_baseline"] > 0
    assert record["profile"].endswith(f"profile-{ran[0]['variant']}-{path.name.split('-')[1]}.txt")
    if not torch.cuda.is_available():  # a CPU's defaults: fp32, eager and compiled; fp8 compiled is skipped
        names = [r["variant"] for r in record["results"]]
        assert names == ["eager-fp32", "compile-fp32", "eager-fp8", "compile-fp8", "baseline"]
        assert "cannot compile the fp8 KV cache" in record["results"][3]["skipped"]


TINY = ["--config", "tiny", "--height", "32", "--width", "32", "--vae-base-dim", "8", "--frames-per-chunk", "2",
        "--window", "4", "--chunks", "1", "--long-frames", "4", "--no-baseline"]  # fmt: skip


def test_bench_bf16_kv_cache_on_cpu_writes_to_the_current_directory(tmp_path, monkeypatch, capsys):
    """A bf16 cache runs its DiT in bf16 (the ring holds K/V in the DiT's dtype), whatever --dtype; the JSON lands
    in the current directory, not in the checkout."""
    from sfpp.benchmark import e2e

    monkeypatch.chdir(tmp_path)
    assert e2e.main([*TINY, "--modes", "eager", "--kv-dtypes", "bf16,fp32", "--dtype", "float32"]) == 0
    (path,) = tmp_path.glob("e2e-*.json")
    bf16, fp32 = json.loads(path.read_text())["results"]
    assert (bf16["dit_dtype"], fp32["dit_dtype"]) == ("bfloat16", "float32")
    assert bf16["dit_fps"] > 0 and bf16["kv_cache_mib"] < 0.6 * fp32["kv_cache_mib"]  # 2 bytes an element, not 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU cannot run")
def test_bench_skips_what_the_device_cannot_run(tmp_path, capsys):
    from sfpp.benchmark import e2e

    assert e2e.main([*TINY, "--modes", "graph,compile", "--kv-dtypes", "fp8", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "graph-fp8: skipped: CUDA graphs need a CUDA device" in out
    assert "compile-fp8: skipped: torch.compile cannot compile the fp8 KV cache" in out


def test_bench_failed_variant_exits_1_unless_keep_going(tmp_path, monkeypatch, capsys):
    from sfpp.benchmark import e2e
    from sfpp.cli import main

    def broken(self, mode, kv, long):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(e2e.Harness, "sfpp", broken)
    args = ["bench", *TINY, "--modes", "eager", "--kv-dtypes", "fp32", "--out-dir", str(tmp_path)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "eager-fp32: FAILED: RuntimeError: kernel exploded" in captured.out
    assert "1 of 1 variants failed: eager-fp32" in captured.err
    assert main([*args, "--keep-going"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's defaults")
def test_bench_defaults_are_sfpp_generate_defaults_on_cpu():
    from sfpp.benchmark.e2e import parse

    args = parse([])
    assert (args.dtype, args.kernels, args.modes, args.kv_dtypes) == ("float32", "none", ["eager", "compile"],
                                                                     ["fp32", "fp8"])  # fmt: skip


def test_bench_bad_arguments(capsys):
    from sfpp.benchmark.e2e import parse

    with pytest.raises(SystemExit):
        parse(["--height", "40"])
    assert "multiples of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--modes", "turbo"])
    assert "unknown mode 'turbo'" in capsys.readouterr().err


def test_campaign_smoke(tmp_path):
    """The GPU campaign's command runs end to end at tiny shapes: every step passes, a JSON per benchmark that
    writes one, and a summary generated from them."""
    from bench import campaign

    assert campaign.main(["--smoke", "--out", str(tmp_path)]) == 0
    steps = json.loads((tmp_path / "campaign.json").read_text())
    assert [s["status"] for s in steps] == ["passed"] * len(campaign.steps(True, tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    assert "**e2e**" in summary and "| variant |" in summary and "baseline" in summary


def test_campaign_fails_on_a_failed_gpu_test(tmp_path, monkeypatch):
    from bench import campaign

    failing = campaign.Step("gpu_tests", ("pytest", "-q", "tests/does_not_exist.py"), 60, is_test=True)
    monkeypatch.setattr(campaign, "steps", lambda smoke, out: [failing])
    assert campaign.main(["--smoke", "--out", str(tmp_path)]) == 1
    assert "failed" in json.loads((tmp_path / "campaign.json").read_text())[0]["status"]


def test_report_rewrites_only_the_generated_block(tmp_path):
    from bench import report

    record = {"benchmark": "x", "device": "d", "commit": "c", "date": "t", "command": "python -m bench.x",
              "rows": [{"variant": "a", "ms": 1.23456}, {"variant": "b", "ms": 2.0}]}  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.update_readme(readme, [tmp_path / "x.json"])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| a | 1.235 |" in text and "`python -m bench.x`" in text
    with pytest.raises(ValueError, match="generated block"):
        report.update_readme(tmp_path / "x.json", [])
