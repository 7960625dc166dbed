"""Compile the kernels' real launches for a GPU this machine does not have (sm_90, sm_80), and read what came out.

Each launcher (`ring_attention`, `cache_write`, `adaln_modulate`) is called on CPU tensors of the production shapes;
its kernel launch is intercepted and compiled ahead of time by `triton.compile` for the target, with exactly the
signature, constexprs, divisibility hints and options that Triton's own launch would derive from those arguments
(Triton's binder and argument packer, run for the target's backend). Nothing runs: a launch that only Triton's
interpreter accepts fails here. Besides the TTGIR, each case keeps its SASS (the bundled `cuobjdump`) and
records what ptxas made of it: registers, stack frame and spill bytes (`ptxas -v`, rerun on the PTX with
Triton's own ptxas and flags) and the instruction mix of the hot loop (`sass_loop_mix`: the SASS loop, a
backward branch's range, that holds the most matrix instructions), which tests/test_compile_targets.py holds
against a table. Needs TRITON_INTERPRET unset in this process (a jitted function is bound to the
interpreter at import), hence a command line that tests/test_compile_targets.py runs in subprocesses:

    python -m bench.aot --out /tmp/aot            # every case; JSON summary + TTGIR per case in --out
    python -m bench.aot --out /tmp/aot --shard 0/2 --only ring_attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Shared memory a block may use (bytes): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}


@dataclass(frozen=True)
class Shape:
    """Attention and cache shapes of one model at one resolution."""

    name: str
    heads: int
    head_dim: int
    height: int  # latent patches per frame
    width: int
    chunk_frames: int
    window: int

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width


SHAPES = (
    Shape("wan1.3b-832x480", heads=12, head_dim=128, height=30, width=52, chunk_frames=3, window=21),  # 4680 / 32760
    Shape("toy-32x32", heads=4, head_dim=32, height=4, width=4, chunk_frames=3, window=12),  # the shipped model
)


@dataclass(frozen=True)
class Case:
    op: str
    arch: int
    shape: Shape
    variant: str  # "bf16", "fp8" (K/V cache), "fp32", "x-transposed" (adaLN input layout) ...

    @property
    def name(self) -> str:
        return f"{self.op}-sm{self.arch}-{self.shape.name}-{self.variant}"


def cases() -> list[Case]:
    out = []
    for arch in (90, 80):
        for shape in SHAPES:
            kv_dtypes = ("bf16", "fp8") if arch >= 89 else ("bf16",)  # Triton has no e4m3 before sm_89
            out += [Case("ring_attention", arch, shape, kv) for kv in kv_dtypes]
            if shape is SHAPES[0]:  # fp32 through the same launcher (no tensor cores: the fp32 tile)
                out.append(Case("ring_attention", arch, shape, "fp32"))
                if arch >= 90:  # the TMA candidate tile (bench_ring_attention measures it; the launcher never picks it)
                    out.append(Case("ring_attention", arch, shape, "bf16-tma"))
            out += [Case("cache_write", arch, shape, kv) for kv in kv_dtypes]
            out += [Case("adaln_modulate", arch, shape, layout) for layout in ("x-contiguous", "x-transposed")]
    return out


@contextlib.contextmanager
def intercept(kernel) -> Iterator[list[tuple[tuple, dict]]]:
    """Record the launches of a @triton.jit kernel instead of running them (`kernel[grid](...)` calls `run`)."""
    calls: list[tuple[tuple, dict]] = []

    def run(*args, grid, warmup, **kwargs):
        calls.append((args, kwargs))

    kernel.run = run  # shadows JITFunction.run for this instance
    try:
        yield calls
    finally:
        del kernel.run


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """triton.compile of one recorded launch for sm_<arch>, specialized as Triton's launcher specializes it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug)
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    """A CUDA binary tool, the copy Triton ships (`cuobjdump`, `nvdisasm`, `ptxas`, `ptxas-blackwell`)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True) -> dict:
    """`ptxas -v` on the PTX, with the ptxas and flags Triton's `make_cubin` uses: registers, stack frame and spill
    bytes (spills are what `STL`/`LDL` in the SASS cost; the stack frame also holds local arrays)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [_tool("ptxas-blackwell" if arch >= 90 else "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
               str(src), "-o", str(Path(d) / "k.cubin")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"no {pattern!r} in the ptxas log:\n{log}")
        return int(m.group(1))

    return {
        "regs": number(r"Used (\d+) registers"),
        "stack": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with its modifiers, the instruction without its predicate) for each SASS instruction."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][^;]*);", sass):
        text = m.group(2).strip()
        out.append((int(m.group(1), 16), text.split()[0], text))
    return out


MMA_OPS = ("HGMMA", "QGMMA", "HMMA", "IMMA")  # warpgroup bf16/fp16/tf32, warpgroup fp8, mma.sync


def sass_loop_mix(sass: str) -> dict:
    """The instruction mix of the hot loop: among the loops (the range from a backward branch's target to the
    branch), the one with the most matrix instructions (then FFMAs: fp32 without tensor cores), the smallest on a
    tie. {"instructions": n, opcode base: count, ..., "mma": {opcode with modifiers: count}, "ldg": {LDG opcode
    with modifiers: count}}; {} if no loop has an MMA or an FFMA."""
    ins = sass_instructions(sass)
    best = None
    for addr, op, text in ins:
        m = re.match(r"BRA(?:\.\S+)? (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if not (op.startswith("BRA") and m) or int(m.group(1), 16) > addr:
            continue
        body = [(o, t) for a, o, t in ins if int(m.group(1), 16) <= a <= addr]
        work = (sum(o.split(".")[0] in MMA_OPS for o, _ in body), sum(o.startswith("FFMA") for o, _ in body))
        if any(work) and (best is None or (*work, -len(body)) > (*best[0], -len(best[1]))):
            best = (work, body)
    if best is None:
        return {}
    body = best[1]
    mix: dict = dict(Counter(o.split(".")[0] for o, _ in body), instructions=len(body))
    mix["mma"] = dict(Counter(o for o, _ in body if o.split(".")[0] in MMA_OPS))
    mix["ldg"] = dict(Counter(o for o, _ in body if o.split(".")[0] == "LDG"))
    return mix


def _launch(case: Case) -> tuple[object, Callable[[], None]]:
    """(the jitted kernel, a call of its launcher on CPU tensors of the case's shapes)."""
    from sfpp.engine.cache import RingKVCache
    from sfpp.engine.rope import rope_table
    from sfpp.models.dit import WanConfig

    s, fp8 = case.shape, case.variant == "fp8"
    cfg = WanConfig(dim=s.heads * s.head_dim, num_heads=s.heads, num_layers=1)
    tokens = s.chunk_frames * s.frame_tokens
    dtype = torch.float32 if case.variant == "fp32" else torch.bfloat16  # the compute dtype

    def cache() -> RingKVCache:
        kv_dtype = torch.float8_e4m3fn if fp8 else dtype
        return RingKVCache(cfg, batch_size=1, frame_tokens=s.frame_tokens, window=s.window, dtype=dtype,
                           kv_dtype=kv_dtype)  # fmt: skip

    if case.op == "ring_attention":
        from sfpp.kernels import ring_attention as mod

        c = cache()
        c.frames_done = s.window - s.chunk_frames  # a full ring (fill level does not change the launch)
        c.chunk_start.fill_(c.frames_done)
        plan = c.plan(1, s.chunk_frames, s.frame_tokens)
        q = torch.empty(1, tokens, s.heads, s.head_dim, dtype=dtype)
        tile = mod.TILES["hopper_tma"] if case.variant == "bf16-tma" else None
        return mod._ring_attention_kernel, lambda: mod.ring_attention(q, *c.layer(0)[:2], plan.valid_rows,
                                                                        *c.layer(0)[2:], tile=tile)  # fmt: skip
    if case.op == "cache_write":
        from sfpp.kernels import cache_write as mod

        c = cache()
        plan = c.plan(1, s.chunk_frames, s.frame_tokens)
        q, k, v = (torch.empty(1, tokens, cfg.dim, dtype=dtype) for _ in "qkv")
        norms = [torch.ones(cfg.dim, dtype=dtype) for _ in "qk"]
        args = (q, k, v, *norms, *rope_table(cfg), plan.frame_pos, plan.token_index, *c.layer(0))
        return mod._cache_write_kernel, lambda: mod.cache_write(*args, s.height, s.width, cfg.rope_split, cfg.eps)
    if case.op == "adaln_modulate":
        from sfpp.kernels import adaln as mod

        x = torch.empty(1, tokens, cfg.dim)  # the fp32 residual stream
        if case.variant == "x-transposed":  # block 0 gets the patch embedding's transposed view
            x = torch.empty(1, cfg.dim, tokens).transpose(1, 2)
        shift, scale = (torch.empty(1, s.chunk_frames, 1, cfg.dim) for _ in "ab")
        return mod._kernel, lambda: mod.adaln_modulate(x, shift, scale, cfg.eps, dtype)
    raise ValueError(f"unknown op {case.op!r}")


def compile_case(case: Case, out_dir: Path) -> dict:
    """Compile one case; returns its summary (and writes its TTGIR next to it)."""
    from sfpp.kernels import _device

    record: dict = {"name": case.name, "op": case.op, "arch": case.arch, "shape": case.shape.name,
                    "variant": case.variant}  # fmt: skip
    start = time.perf_counter()
    try:
        kernel, launch = _launch(case)
        arch_of = _device.arch
        _device.arch = lambda device: case.arch  # the launchers decide for the target GPU
        try:
            with intercept(kernel) as calls:
                launch()
        finally:
            _device.arch = arch_of
        if len(calls) != 1:
            raise RuntimeError(f"expected one launch, recorded {len(calls)}")
        args, kwargs = calls[0]
        compiled = compile_launch(kernel, args, kwargs, case.arch)
        meta = compiled.metadata
        record.update(
            ok=True, shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
            constexprs={k: str(v) for k, v in kwargs.items() if k.isupper()},
        )  # fmt: skip
        sass = sass_of(compiled.asm["cubin"])
        record.update(ptxas_usage(compiled.asm["ptx"], case.arch, compiled.metadata.enable_fp_fusion),
                      loop=sass_loop_mix(sass))  # fmt: skip
        (out_dir / f"{case.name}.ttgir").write_text(compiled.asm["ttgir"])
        (out_dir / f"{case.name}.sass").write_text(sass)
    except Exception as e:  # noqa: BLE001 (the failure is the result: the test reports it)
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:4000], traceback=traceback.format_exc()[-4000:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary-<shard>.json and one .ttgir per case")
    p.add_argument("--shard", default="0/1", help="i/n: compile every n-th case starting at i")
    p.add_argument("--only", nargs="*", default=None, help="ops to compile (default: all)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 binds the kernels to the interpreter: unset it for ahead-of-time compiles")
    index, count = (int(x) for x in args.shard.split("/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases() if args.only is None or c.op in args.only][index::count]
    records = []
    for case in todo:
        records.append(compile_case(case, out))
        r = records[-1]
        print(f"{r['name']:60s} {'ok' if r['ok'] else 'FAILED'} {r['seconds']:6.1f} s", file=sys.stderr)
    (out / f"summary-{index}.json").write_text(json.dumps(records, indent=1))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
