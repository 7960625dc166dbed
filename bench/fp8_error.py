"""rms error of ring attention over an fp8 K/V cache, head dim 128, against fp64 references: over the dequantized
cache (the error of the kernel's products) and over the bf16 K/V before quantization (plus the cache's own
rounding). Random bf16 inputs, a ragged prefix, the production fp8 tile; on CPU through Triton's interpreter.

    python -m bench.fp8_error
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] copied into the fp8 cache's V layout (rows contiguous)."""
    out = torch.empty(x.shape[0], *x.shape[2:], x.shape[1], dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    out.view(torch.uint8).copy_(x.view(torch.uint8))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500, help="valid prefix of the 512-row cache (default 500: ragged)")
    args = p.parse_args(argv)
    from sfpp.kernels.fp8 import dequantize_fp8, quantize_fp8
    from sfpp.kernels.reference import ring_attention_ref
    from sfpp.kernels.ring_attention import TILES, ring_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lq, heads, d, rows, tile = 128, 2, 128, args.rows, TILES["hopper_fp8"]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()

    out = []
    for seed, q_scale in [(0, 1.0), (1, 1.0), (2, 3.0)]:  # q_scale 3: peakier softmax
        g = torch.Generator(device).manual_seed(seed)
        q = (torch.randn(1, lq, heads, d, generator=g, device=device) * q_scale).bfloat16()
        k, v = (torch.randn(1, 512, heads, d, generator=g, device=device).bfloat16() for _ in "kv")
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        o = ring_attention(q, k8, rows_contiguous(v8), torch.tensor(rows, device=device), ks, vs, tile=tile).double()
        ref = ring_attention_ref(q.double(), k.double(), v.double(), rows)
        dq = ring_attention_ref(q.double(), dequantize_fp8(k8, ks).double(), dequantize_fp8(v8, vs).double(), rows)
        r = {"seed": seed, "q_scale": q_scale, "vs_dequantized": rel(o, dq), "vs_bf16": rel(o, ref),
             "storage_alone": rel(dq, ref)}  # fmt: skip
        out.append(r)
        print(f"tile {tuple(tile)} seed {seed} q x{q_scale}: rms error / rms output: {r['vs_dequantized']:.4f} vs "
              f"fp64 on the dequantized cache, {r['vs_bf16']:.4f} vs fp64 on the bf16 K/V "
              f"(the cache's rounding alone: {r['storage_alone']:.4f})")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
