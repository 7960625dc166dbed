"""Ring attention of one chunk over the full KV cache: ours (triton: bf16, fp8 K/V, fp8 tensor cores) against torch
SDPA per backend, FlexAttention with a block mask, flash-attn and xformers where installed, measured in one run.

    python -m bench.bench_ring_attention                      # Wan 1.3B: 4680 queries, 12 heads of 128, 21 frames
    python -m bench.bench_ring_attention --windows 6 12 21    # smaller windows too

Reports TFLOP/s (4 * B * H * Lq * Lk * D / time) and saves JSON under bench/results/. Needs a CUDA GPU; on a CPU
it runs a tiny smoke configuration of our kernel through Triton's interpreter and saves nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import save

FRAME_TOKENS = 1560  # 480x832 latents: 30 x 52 patches


def bench_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200)


def providers(q, k, v, slot_frame, tokens):
    """name -> zero-argument callable, for every provider that can run here."""
    from kernels.ring_attention import ring_attention
    from sfpp.cache import quantize_fp8

    (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
    out = {
        "ours-triton-bf16": lambda: ring_attention(q, k, v, slot_frame, tokens),
        "ours-triton-fp8kv": lambda: ring_attention(q, k8, v8, slot_frame, tokens, ks, vs),
        "ours-triton-fp8dot": lambda: ring_attention(q, k8, v8, slot_frame, tokens, ks, vs, fp8_dot=True),
    }
    if q.device.type != "cuda":
        return out
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views, as SDPA takes them
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)]:  # fmt: skip

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)  # the full ring: every key valid, no mask

        try:
            run()
            out[f"torch-sdpa-{name}"] = run
        except RuntimeError:
            pass
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        valid = (slot_frame >= 0).repeat_interleave(tokens)
        mask = create_block_mask(lambda b, h, qi, ki: valid[ki], None, None, q.shape[1], k.shape[1], q.device)
        flex = torch.compile(flex_attention)
        flex(qt, kt, vt, block_mask=mask)
        out["flex-attention"] = lambda: flex(qt, kt, vt, block_mask=mask)
    except Exception as e:  # noqa: BLE001 (a baseline that cannot run here is reported, not fatal)
        print(f"flex-attention unavailable: {e}", file=sys.stderr)
    try:
        from flash_attn import flash_attn_func

        out["flash-attn"] = lambda: flash_attn_func(q, k, v)
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        out["xformers"] = lambda: xops.memory_efficient_attention(q, k, v)
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, nargs="+", default=[6, 12, 21], help="ring sizes in latent frames")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = FRAME_TOKENS
    if device.type == "cpu":  # smoke run only: the interpreter proves the script works, not the speed
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run of our kernel at a tiny size through Triton's interpreter; nothing saved")
        args.windows, args.heads, args.head_dim, tokens = [2], 2, 16, 8

    rows = []
    for window in args.windows:
        g = torch.Generator(device).manual_seed(0)
        lq, lk = args.chunk_frames * tokens, window * tokens
        q = torch.randn(1, lq, args.heads, args.head_dim, generator=g, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, lk, args.heads, args.head_dim, generator=g, device=device, dtype=torch.bfloat16)
                for _ in "kv")  # fmt: skip
        slot_frame = torch.arange(window, device=device)
        flops = 4 * args.heads * lq * lk * args.head_dim
        for name, fn in providers(q, k, v, slot_frame, tokens).items():
            if device.type != "cuda":
                fn()  # smoke: it runs
            ms = bench_ms(fn, device)
            rows.append({"provider": name, "window": window, "lq": lq, "lk": lk, "ms": ms, "tflops": flops / ms / 1e9})
            print(f"window {window:3d} ({lk} keys) {name:22s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    if device.type != "cuda":
        return {"rows": rows}
    results = {"heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16", "rows": rows}
    print("saved", save("bench_ring_attention", device, results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
