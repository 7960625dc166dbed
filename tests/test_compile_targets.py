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
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton")

from bench.aot import SHARED_LIMIT, cases, sass_instructions  # noqa: E402
from sfpp.kernels.ring_attention import TILES, tile_name  # noqa: E402

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
    """Each tile `tile_name` can pick on a GPU is picked for some production shape, and so compiled above."""
    records, _ = compiled
    used = {
        (
            int(r["constexprs"]["BLOCK_M"]),
            int(r["constexprs"]["BLOCK_N"]),
            r["num_warps"],
            r["num_stages"],
            r["constexprs"]["TMA"] == "True",
        )  # fmt: skip
        for r in records.values()
        if r["op"] == "ring_attention" and r["ok"]
    }
    gpu_tiles = {tuple(t) for name, t in TILES.items() if name != "interpreter"}
    assert used == gpu_tiles


class Gate(NamedTuple):
    """What one ring-attention launch must compile to. Besides: no spill bytes, no stack frame, no local-memory
    instruction (LDL/STL) anywhere in the kernel, no plain global load (LDG) in the SASS hot loop, and the key
    loop's trip count computed from the valid prefix the kernel loads (ValidRows)."""

    tile: str  # the TILES entry the launcher picks
    regs: int  # registers per thread, at most
    mma: dict[str, int]  # matrix instructions in the SASS hot loop, opcode with modifiers -> count, exactly
    copies: dict[str, int]  # asynchronous global -> shared copies in the hot loop (LDGSTS: cp.async, UTMALDG: TMA)
    sts: int = 0  # stores to shared memory in the hot loop: a register round trip of an operand shows here
    ffma: int = 0  # at least this many FFMA in the hot loop (fp32 without tensor cores: the product is FFMAs)


# Every launch the ring-attention launcher makes at the production shapes, written once. Counts per thread of the
# loop body: e.g. hopper: 8 HGMMA k-steps (D 128 / 16) for Q K^T + 8 (BLOCK_N 128 / 16) for P V, and 2 x 8
# 16-byte cp.async per thread for the 32 KiB K and V tiles (256 threads).
GATE = {
    "ring_attention-sm90-wan1.3b-832x480-bf16": Gate("hopper", 238, {"HGMMA.64x128x16.F32.BF16": 16}, {"LDGSTS": 16}),
    # the TMA candidate: one bulk tensor copy per K and V tile (issued by one thread), no cp.async
    "ring_attention-sm90-wan1.3b-832x480-bf16-tma": Gate("hopper_tma", 193, {"HGMMA.64x128x16.F32.BF16": 16},
                                                         {"UTMALDG": 2}),
    # two fp8 terms for Q and P: 2 x (4 k-steps of 32 for Q K^T at D 128, 2 for P V at BLOCK_N 64)
    "ring_attention-sm90-wan1.3b-832x480-fp8": Gate("hopper_fp8", 251, {"QGMMA.64x64x32.F32.E4M3.E4M3": 8,
                                                                       "QGMMA.64x128x32.F32.E4M3.E4M3": 4},
                                                    {"LDGSTS": 6}),
    # ieee fp32 on FFMAs: 32 x 32 x 128 (Q K^T) + 32 x 128 x 32 (P V) over 256 threads; P changes layout via shared
    "ring_attention-sm90-wan1.3b-832x480-fp32": Gate("fp32", 180, {}, {"LDGSTS": 8}, sts=2, ffma=1024),
    "ring_attention-sm90-toy-32x32-bf16": Gate("small", 96, {"HGMMA.64x64x16.F32.BF16": 2,
                                                            "HGMMA.64x32x16.F32.BF16": 4}, {"LDGSTS": 4}),
    "ring_attention-sm90-toy-32x32-fp8": Gate("small", 142, {"QGMMA.64x64x32.F32.E4M3.E4M3": 2,
                                                            "QGMMA.64x32x32.F32.E4M3.E4M3": 4}, {"LDGSTS": 4}),
    "ring_attention-sm80-wan1.3b-832x480-bf16": Gate("ampere", 194, {"HMMA.16816.F32.BF16": 128}, {"LDGSTS": 8}),
    "ring_attention-sm80-wan1.3b-832x480-fp32": Gate("fp32", 168, {}, {"LDGSTS": 8}, sts=2, ffma=1024),
    "ring_attention-sm80-toy-32x32-bf16": Gate("small", 105, {"HMMA.16816.F32.BF16": 32}, {"LDGSTS": 4}),
}  # fmt: skip
ATTENTION = [c for c in CASES if c.op == "ring_attention"]


def test_the_gate_covers_every_launch_and_every_gpu_tile():
    assert set(GATE) == {c.name for c in ATTENTION}
    assert {g.tile for g in GATE.values()} == {name for name in TILES if name != "interpreter"}


def _record(compiled, case) -> dict:
    records, _ = compiled
    r = records[case.name]
    if not r["ok"]:
        pytest.fail(f"{case.name} did not compile")
    return r


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_ring_attention_takes_its_tile_without_spilling(compiled, case):
    r, gate = _record(compiled, case), GATE[case.name]
    dtype = torch.float32 if case.variant == "fp32" else torch.bfloat16
    tokens = case.shape.chunk_frames * case.shape.frame_tokens
    picked = tile_name(case.arch, case.shape.head_dim, tokens, dtype, case.variant == "fp8")
    assert ("hopper_tma" if case.variant == "bf16-tma" else picked) == gate.tile  # the candidate: bench.aot's choice
    c = r["constexprs"]
    tile = (int(c["BLOCK_M"]), int(c["BLOCK_N"]), r["num_warps"], r["num_stages"], c["TMA"] == "True")
    assert tile == tuple(TILES[gate.tile])
    usage = {k: r[k] for k in ("regs", "stack", "spill_stores", "spill_loads")}
    assert r["regs"] <= gate.regs, usage
    assert usage == dict(usage, stack=0, spill_stores=0, spill_loads=0), usage
    sass = (compiled[1] / f"{case.name}.sass").read_text()
    local = [t for _, op, t in sass_instructions(sass) if op.split(".")[0] in ("LDL", "STL")]
    assert not local, local[:5]


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_ring_attention_sass_hot_loop(compiled, case):
    """The instruction mix of the SASS loop that does the work: tensor-core kind and count, the asynchronous copies
    that bring K and V, nothing that reads global memory synchronously, nothing that goes through local memory."""
    loop, gate = _record(compiled, case)["loop"], GATE[case.name]
    assert loop, "no loop in the SASS"
    assert loop["mma"] == gate.mma, loop["mma"]
    assert {op: loop.get(op, 0) for op in gate.copies} == gate.copies, loop
    assert {op: loop.get(op, 0) for op in ("LDGSTS", "UTMALDG") if op not in gate.copies} == dict.fromkeys(
        (op for op in ("LDGSTS", "UTMALDG") if op not in gate.copies), 0
    )
    assert loop.get("LDG", 0) == 0, f"plain global loads in the hot loop: {loop['ldg']}"
    assert loop.get("LDL", 0) == loop.get("STL", 0) == 0
    assert loop.get("STS", 0) == gate.sts, "stores to shared memory in the hot loop (a register round trip)"
    assert loop.get("FFMA", 0) >= gate.ffma


def hot_loop(ttgir: str) -> tuple[str, str]:
    """(the scf.for line, its body) of the first scf.for that holds a matrix product: the key loop."""
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
            return line, text
    raise AssertionError("no loop with a matrix product in the TTGIR")


def depends_on(ttgir: str, value: str, pattern: str) -> bool:
    """Whether SSA value `value` (e.g. "%n_full_47") is computed from an op whose line matches `pattern`."""
    defs = {}
    for line in ttgir.splitlines():
        m = re.match(r"\s*(%[\w.$-]+)(?::\d+)? = (.*)", line)
        if m:
            defs[m.group(1)] = m.group(2)
    seen, todo = set(), [value]
    while todo:
        v = re.sub(r"#\d+$", "", todo.pop())
        if v in seen or v not in defs:
            continue
        seen.add(v)
        if re.search(pattern, defs[v]):
            return True
        todo += re.findall(r"%[\w.$-]+", defs[v].split(" loc(")[0])
    return False


def tile_copies(loop: str) -> int:
    """Asynchronous copies of 2-D tiles into shared memory (cp.async or TMA)."""
    cp_async = re.findall(r"ttg\.async_copy_global_to_local .*-> <\d+x\d+x", loop)
    return len(cp_async) + len(re.findall(r"ttng\.async_tma_copy_global_to_local", loop))


@pytest.mark.parametrize("case", [c for c in ATTENTION if c.variant != "fp32"], ids=lambda c: c.name)
def test_ring_attention_hot_loop(compiled, case):
    records, folder = compiled
    if not records[case.name]["ok"]:
        pytest.fail(f"{case.name} did not compile")
    ttgir = (folder / f"{case.name}.ttgir").read_text()
    head, loop = hot_loop(ttgir)
    upper = re.search(r"scf\.for %\S+ = %\S+ to (%\S+) step", head).group(1)
    assert depends_on(ttgir, upper, r"tt\.load %ValidRows"), "the key loop must stop at the valid prefix"
    assert tile_copies(loop) >= 2, "K and V tiles must arrive by asynchronous copies"
    # Triton 3.9 still pipelines a volatile 16-bit tile (the SASS is the same), but it is a request to re-read
    assert "isVolatile = true" not in loop and "volatile" not in head, "volatile loads in the key loop"
    assert not re.search(r"tt\.load .*: tensor<\d+x\d+x", loop), "a synchronous load of a 2-D tile in the loop"
    if case.arch >= 90:
        dots = 4 if case.variant == "fp8" else 2  # fp8: Q and P as two fp8 terms each
        assert len(re.findall(r"ttng\.warp_group_dot ", loop)) == dots, "both products must be warpgroup MMAs"
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
