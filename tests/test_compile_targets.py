"""Every Triton kernel compiles for the GPUs it targets, without one: each launcher's real launch at the production
shapes (Wan2.1-1.3B at 832x480, the shipped toy model), bf16 and fp8 K/V, is compiled ahead of time for sm_90 and
sm_80 by `bench.aot` (Triton's own specialization: the divisibility hints, tiles, warps and stages the launch
passes), every tile the ring-attention launcher can choose is among them, and the Hopper hot loop of ring attention
is what the roofline needs: K/V tiles by asynchronous copies, warpgroup MMAs, no register-to-shared round trip.
A kernel only Triton's interpreter accepts fails here. The compiles run once per session in two subprocesses
(TRITON_INTERPRET must be unset for them)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from bench.aot import SHARED_LIMIT, cases  # noqa: E402
from sfpp.kernels.ring_attention import TILES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = cases()
JOBS = 2


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, Path]:
    """{case name: record} and the folder of TTGIR files, for every case, compiled once."""
    out = tmp_path_factory.mktemp("aot")
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.aot", "--out", str(out), "--shard", f"{i}/{JOBS}"],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(JOBS)
    ]  # fmt: skip
    logs = [p.communicate(timeout=900)[0] for p in procs]
    records = {}
    for i in range(JOBS):
        summary = out / f"summary-{i}.json"
        assert summary.exists(), logs[i][-4000:]
        records.update((r["name"], r) for r in json.loads(summary.read_text()))
    return records, out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_launch_compiles_and_fits_shared_memory(compiled, case):
    records, _ = compiled
    r = records[case.name]
    assert r["ok"], r.get("traceback") or r.get("error")
    assert r["shared"] <= SHARED_LIMIT[case.arch], f"{r['shared']} bytes of shared memory on sm_{case.arch}"


def test_ring_attention_launches_cover_every_gpu_tile(compiled):
    """Each tile `tile_for` can pick on a GPU is picked for some production shape, and so compiled above."""
    records, _ = compiled
    used = {
        (int(r["constexprs"]["BLOCK_M"]), int(r["constexprs"]["BLOCK_N"]), r["num_warps"], r["num_stages"])
        for r in records.values()
        if r["op"] == "ring_attention" and r["ok"]
    }
    gpu_tiles = {tuple(t) for name, t in TILES.items() if name != "interpreter"}
    assert used == gpu_tiles


def hot_loop(ttgir: str) -> str:
    """The body of the first scf.for that holds a matrix product: the key loop of ring attention."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for other in lines[i + 1 :]:
            if len(other) - len(other.lstrip()) == indent and other.lstrip().startswith("}"):
                break
            body.append(other)
        text = "\n".join(body)
        if "warp_group_dot" in text or "tt.dot " in text:
            return text
    raise AssertionError("no loop with a matrix product in the TTGIR")


def tile_copies(loop: str) -> int:
    """Asynchronous copies of 2-D tiles into shared memory (cp.async or TMA)."""
    cp_async = re.findall(r"ttg\.async_copy_global_to_local .*-> <\d+x\d+x", loop)
    return len(cp_async) + len(re.findall(r"ttng\.async_tma_copy_global_to_local", loop))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.op == "ring_attention" and c.variant != "fp32"], ids=lambda c: c.name
)
def test_ring_attention_hot_loop(compiled, case):
    records, folder = compiled
    if not records[case.name]["ok"]:
        pytest.fail(f"{case.name} did not compile")
    loop = hot_loop((folder / f"{case.name}.ttgir").read_text())
    assert tile_copies(loop) >= 2, "K and V tiles must arrive by asynchronous copies"
    assert not re.search(r"tt\.load .*: tensor<\d+x\d+x", loop), "a synchronous load of a 2-D tile in the loop"
    if case.arch >= 90:
        assert len(re.findall(r"ttng\.warp_group_dot ", loop)) == 2, "both products must be warpgroup MMAs"
        assert "tt.dot " not in loop
        # Operands go global -> shared -> tensor cores; a tile stored from registers would be a round trip
        assert not re.search(r"ttg\.local_alloc %", loop) and "ttg.local_store" not in loop
    else:
        assert len(re.findall(r"tt\.dot ", loop)) == 2


def test_a_kernel_only_the_interpreter_accepts_fails_to_compile(tmp_path):
    """A plain Python global inside @triton.jit (the fp8 kernel's old FP8_MAX): the interpreter runs it, the
    compiler rejects it, and so does this harness."""
    (tmp_path / "global_kernel.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            SCALE = 448.0  # not a tl.constexpr


            @triton.jit
            def kernel(X):
                tl.store(X, tl.load(X) * SCALE)
            """
        )
    )
    script = textwrap.dedent(
        """
        import torch
        import global_kernel
        from bench.aot import compile_launch, intercept

        with intercept(global_kernel.kernel) as calls:
            global_kernel.kernel[(1,)](torch.ones(1))
        try:
            compile_launch(global_kernel.kernel, *calls[0], 90)
        except Exception as e:
            print("rejected:", type(e).__name__, e)
        else:
            print("compiled")
        """
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "rejected:" in result.stdout and "SCALE" in result.stdout, result.stdout + result.stderr[-3000:]
    if os.environ.get("TRITON_INTERPRET") == "1":  # and the interpreter would have run it
        sys.path.insert(0, str(tmp_path))
        try:
            import global_kernel

            x = torch.ones(1)
            global_kernel.kernel[(1,)](x)
            assert x.item() == 448.0
        finally:
            sys.path.remove(str(tmp_path))
