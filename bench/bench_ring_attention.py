"""Ring attention of one chunk over the valid prefix of the KV cache, at each fill level: ours (Triton, every GPU tile
configuration, bf16 and fp8 K/V) against the torch backend of `sfpp.engine.ops` (SDPA over the prefix, no mask), each
SDPA backend, FlexAttention, flash-attn and xformers where installed, measured in one run.

    python -m bench.bench_ring_attention                      # Wan 1.3B: 4680 queries, 12 heads of 128
    python -m bench.bench_ring_attention --windows 3 6 12 21  # fill levels: 3 frames (first chunk) .. 21 (full)

Reports TFLOP/s (4 * B * H * Lq * Lk * D / time) and saves JSON under bench/results/. First, on any machine, the
roofline of each tile the launcher can choose at these shapes (`roofline`): FLOPs (nominal, and what the tensor
cores execute: padded to whole tiles, twice over for fp8's two-term Q and P), bytes (Q, O and the K/V prefix
with its fp8 scales, each once from HBM; and K/V as every query block streams it through L2), arithmetic
intensity, and the time at H100 SXM peak (989 TFLOP/s dense bf16, 1979 fp8, 3.35 TB/s HBM). At the largest window (the
steady state) it records the fastest backend and Triton tile per GPU model in `sfpp/engine/dispatch_table.json`, which
`backend="auto"` reads (`--table` elsewhere, `--no-table` to leave it). Needs a CUDA GPU; on a CPU it runs a tiny
smoke configuration of our kernel through Triton's interpreter and saves nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import WRITES_GPU, dispatch_meta, parser, save

FRAME_TOKENS = 1560  # 480x832 latents: 30 x 52 patches
H100 = {"bf16": 989e12, "fp8": 1979e12, "hbm": 3.35e12}  # dense tensor-core FLOP/s, HBM bytes/s (SXM)


def roofline(tile, fp8: bool, batch: int, heads: int, lq: int, lk: int, d: int) -> dict:
    """One launch of ring attention with `tile` (a `Tile`) over lk keys: FLOPs, bytes, arithmetic intensity and
    time at H100 peak. Compute: Q K^T and P V, 2 * lq * lk * d each per head, as tensor cores run them: query and
    key counts rounded up to whole tiles, head dim to BLOCK_D, and fp8 twice (Q and P as two fp8 terms each).
    Bytes: q and the output in bf16, K and V (1 byte + a 4-byte scale per row and head for fp8), each read once
    (HBM, if L2 keeps the prefix for the query blocks that share it) and as each query block streams it (L2)."""
    bd = max(16, 1 << (d - 1).bit_length())
    mt, nt = -(-lq // tile.block_m), -(-lk // tile.block_n)
    flops = 4 * batch * heads * lq * lk * d
    mma_flops = 4 * batch * heads * mt * tile.block_m * nt * tile.block_n * bd * (2 if fp8 else 1)
    kv_row = 2 * (d * (1 if fp8 else 2) + (4 if fp8 else 0))  # K and V, bytes per key per head
    hbm = batch * heads * (2 * lq * d * 2 + lk * kv_row)
    l2 = batch * heads * (2 * lq * d * 2 + mt * lk * kv_row)
    peak = H100["fp8" if fp8 else "bf16"]
    t_compute, t_memory = mma_flops / peak, hbm / H100["hbm"]
    return {
        "flops": flops, "mma_flops": mma_flops, "hbm_bytes": hbm, "l2_bytes": l2,
        "intensity": flops / hbm, "ridge": peak / H100["hbm"],
        "us_compute": t_compute * 1e6, "us_hbm": t_memory * 1e6, "us_at_peak": max(t_compute, t_memory) * 1e6,
        "bound": "compute" if t_compute >= t_memory else "memory",
    }  # fmt: skip


def print_roofline(heads: int, lq: int, windows: list[int], d: int, tokens: int) -> list[dict]:
    """The roofline of each tile `tile_name` picks at these shapes on sm_90 (bf16 and fp8 K/V), at H100 peak."""
    from sfpp.kernels.ring_attention import TILES, tile_name

    out = []
    for arch, fp8 in ((90, False), (90, True)):
        name = tile_name(arch, d, lq, torch.bfloat16, fp8)
        tile = TILES[name]
        for window in windows:
            r = roofline(tile, fp8, 1, heads, lq, window * tokens, d)
            out.append({"arch": arch, "kv": "fp8" if fp8 else "bf16", "tile": name, "window": window, **r})
            print(f"roofline sm_{arch} {'fp8 ' if fp8 else 'bf16'} {name:10s} window {window:3d}: "
                  f"{r['flops'] / 1e12:6.2f} TFLOP ({r['mma_flops'] / 1e12:6.2f} on tensor cores), "
                  f"{r['hbm_bytes'] / 1e6:7.1f} MB HBM ({r['l2_bytes'] / 1e9:5.2f} GB through L2), "
                  f"{r['intensity']:6.0f} FLOP/B (ridge {r['ridge']:3.0f}), "
                  f"{r['us_at_peak']:8.1f} us at H100 peak ({r['bound']})")  # fmt: skip
    return out


def bench_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200)


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] copied into the fp8 cache's V layout (rows contiguous, as `RingKVCache` stores fp8 V)."""
    b, n, h, d = x.shape
    out = torch.empty(b, h, d, -(-n // 16) * 16, dtype=x.dtype, device=x.device)[..., :n].permute(0, 3, 1, 2)
    out.view(torch.uint8).copy_(x.view(torch.uint8))
    return out


def providers(q, k, v, rows: int, device: torch.device) -> dict:
    """name -> zero-argument callable, for every provider that can run here; keys attend over k/v[:, :rows]."""
    from sfpp.kernels import _device
    from sfpp.kernels.fp8 import quantize_fp8
    from sfpp.kernels.reference import ring_attention_ref
    from sfpp.kernels.ring_attention import TILES, ring_attention

    kr, vr = k[:, :rows], v[:, :rows]
    valid = torch.tensor(rows, device=device)
    (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
    v8 = rows_contiguous(v8)
    arch = _device.arch(device)
    tiles = {n: t for n, t in TILES.items() if (n == "interpreter") == (arch is None) and (not t.tma or arch >= 90)}
    out = {}
    for name, tile in tiles.items():  # every tile, the launcher's and the candidates (TMA: 16-bit K/V only)
        out[f"triton-bf16-{name}"] = lambda tile=tile: ring_attention(q, k, v, valid, tile=tile)
        if (arch is None or arch >= 89) and not tile.tma:
            out[f"triton-fp8-{name}"] = lambda tile=tile: ring_attention(q, k8, v8, valid, ks, vs, tile=tile)
    out["torch"] = lambda: ring_attention_ref(q, k, v, rows)  # sfpp.engine.ops' torch backend: SDPA over the prefix
    out["torch-fp8"] = lambda: ring_attention_ref(q, k8, v8, rows, ks, vs)  # dequantize the prefix, then SDPA
    if device.type != "cuda":
        return out
    qt, kt, vt = (x.transpose(1, 2) for x in (q, kr, vr))  # [B, H, L, D] views, as SDPA takes them
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)]:  # fmt: skip

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt)

        try:
            run()
            out[f"torch-sdpa-{name}"] = run
        except RuntimeError:
            pass
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        kfull, vfull = k.transpose(1, 2), v.transpose(1, 2)  # the whole ring, the prefix as a block mask
        mask = create_block_mask(lambda b, h, qi, ki: ki < rows, None, None, q.shape[1], k.shape[1], device)
        flex = torch.compile(flex_attention)
        flex(qt, kfull, vfull, block_mask=mask)
        out["flex-attention"] = lambda: flex(qt, kfull, vfull, block_mask=mask)
    except Exception as e:  # noqa: BLE001 (a baseline that cannot run here is reported, not fatal)
        print(f"flex-attention unavailable: {e}", file=sys.stderr)
    try:
        from flash_attn import flash_attn_func

        out["flash-attn"] = lambda: flash_attn_func(q, kr, vr)
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        out["xformers"] = lambda: xops.memory_efficient_attention(q, kr, vr)
    except ImportError:
        pass
    return out


def record_dispatch(rows: list[dict], device: torch.device, table: Path | None) -> dict:
    """The fastest of ours (best tile) and the torch backend at the steady state, bf16 and fp8, into the table."""
    from sfpp.engine import ops

    window = max(r["window"] for r in rows)
    at = {r["provider"]: r["ms"] for r in rows if r["window"] == window}
    chosen = {}
    for op, kind in (("ring_attention", "bf16"), ("ring_attention:fp8", "fp8")):
        tiles = {p.split("-", 2)[2]: ms for p, ms in at.items() if p.startswith(f"triton-{kind}-")}
        torch_ms = at.get("torch" if kind == "bf16" else "torch-fp8", float("nan"))
        if not tiles:
            continue
        best = min(tiles, key=tiles.get)
        ms = {"triton": tiles[best], "torch": torch_ms}
        meta = dispatch_meta("bench_ring_attention", tile=best, window=window)
        chosen[op] = ops.write_dispatch_table(op, torch.cuda.get_device_name(device), ms, meta, table)
    return chosen


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, WRITES_GPU)
    p.add_argument("--windows", type=int, nargs="+", default=[3, 6, 12, 21], help="valid ring frames (fill levels)")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--table", default=None, help="dispatch table to update (default: sfpp/engine/dispatch_table.json)")
    p.add_argument("--no-table", action="store_true", help="do not record the fastest backend")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = FRAME_TOKENS
    lines = print_roofline(args.heads, args.chunk_frames * tokens, args.windows, args.head_dim, tokens)
    if device.type == "cpu":  # smoke run only: the interpreter proves the script works, not the speed
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run of our kernel at a tiny size through Triton's interpreter; nothing saved")
        args.windows, args.heads, args.head_dim, tokens = [2], 2, 16, 8

    g = torch.Generator(device).manual_seed(0)
    lq, lk = args.chunk_frames * tokens, max(args.windows) * tokens
    q = torch.randn(1, lq, args.heads, args.head_dim, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, lk, args.heads, args.head_dim, generator=g, device=device, dtype=torch.bfloat16)
            for _ in "kv")  # fmt: skip
    rows = []
    for window in args.windows:
        valid = window * tokens
        flops = 4 * args.heads * lq * valid * args.head_dim
        for name, fn in providers(q, k, v, valid, device).items():
            try:
                fn()
                ms = bench_ms(fn, device)
            except Exception as e:  # noqa: BLE001 (a tile that does not fit this GPU is reported, not fatal)
                print(f"window {window:3d} {name}: failed ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
                ms = float("nan")
            rows.append({"provider": name, "window": window, "lq": lq, "lk": valid, "ms": ms,
                         "tflops": flops / ms / 1e9})  # fmt: skip
            print(f"window {window:3d} ({valid} keys) {name:26s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    if device.type != "cuda":
        return {"rows": rows, "roofline": lines}
    results = {"heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16", "rows": rows, "roofline": lines}
    if not args.no_table:
        results["dispatch"] = record_dispatch(rows, device, Path(args.table) if args.table else None)
        print("dispatch table:", results["dispatch"])
    print("saved", save("bench_ring_attention", device, results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
