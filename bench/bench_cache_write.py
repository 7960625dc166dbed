"""Fused cache write (q/k RMSNorm + 3D RoPE + ring append, bf16 or fp8 K/V): ours (triton, cuda) against the torch
path (the model's ops) and the copy bandwidth measured in the same run, at the Wan 1.3B chunk (4680 tokens, dim 1536).

    python -m bench.bench_cache_write

GB/s counts the bytes the op must move: read q, k, v; write q, K, V (and the fp8 scales). Records the fastest backend
per K/V dtype for this GPU model in `sfpp/engine/dispatch_table.json`, which `backend="auto"` reads (`--table`
elsewhere, `--no-table` to leave it). Needs a CUDA GPU; on a CPU it runs a tiny smoke configuration through the torch
reference and Triton's interpreter and saves nothing.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from bench.bench_ring_attention import bench_ms
from bench.common import WRITES_GPU, dispatch_meta, parser, save
from sfpp.engine.cache import RingKVCache
from sfpp.engine.rope import rope_table
from sfpp.models.dit import WanConfig


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, WRITES_GPU)
    p.add_argument("--height", type=int, default=30, help="latent patches per frame, rows")
    p.add_argument("--width", type=int, default=52)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--table", default=None, help="dispatch table to update (default: sfpp/engine/dispatch_table.json)")
    p.add_argument("--no-table", action="store_true", help="do not record the fastest backend")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = WanConfig()
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run at a tiny size (torch reference, Triton interpreter); nothing saved")
        cfg, args.height, args.width, args.frames, args.window = WanConfig(dim=48, num_heads=3), 2, 2, 2, 3
    from sfpp.engine import ops

    tokens = args.height * args.width
    length = args.frames * tokens
    tables = [t.to(device) for t in rope_table(cfg)]
    norms = [torch.ones(cfg.dim, device=device, dtype=torch.bfloat16) for _ in range(2)]
    q, k, v = (torch.randn(1, length, cfg.dim, device=device, dtype=torch.bfloat16) for _ in "qkv")
    rows, dispatch = [], {}
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        if kv_dtype == torch.float8_e4m3fn and device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            continue  # no fp8 cache through Triton before sm_89
        cache = RingKVCache(cfg, batch_size=1, frame_tokens=tokens, window=args.window, dtype=torch.bfloat16,
                            kv_dtype=kv_dtype, device=device)  # fmt: skip
        plan = cache.plan(1, args.frames, tokens)
        kv_bytes = 1 if kv_dtype == torch.float8_e4m3fn else 2
        moved = length * cfg.dim * (3 * 2 + 2 + 2 * kv_bytes) + (8 * length * cfg.num_heads if kv_bytes == 1 else 0)
        timed = {}
        for backend in ops.available("cache_write", device):
            args_ = (q, k, v, *norms, *tables, plan.frame_pos, plan.token_index, *cache.layer(0))
            fn = partial(ops.cache_write, *args_, args.height, args.width, cfg.rope_split, cfg.eps, backend=backend)
            fn()
            ms = bench_ms(fn, device)
            timed[backend] = ms
            rows.append({"provider": backend, "kv_dtype": str(kv_dtype), "ms": ms, "gbps": moved / ms / 1e6})
            print(f"{str(kv_dtype):22s} {backend:8s} {ms:8.4f} ms {moved / ms / 1e6:8.1f} GB/s")
        if device.type == "cuda" and not args.no_table:
            op = "cache_write:fp8" if kv_dtype == torch.float8_e4m3fn else "cache_write"
            meta = dispatch_meta("bench_cache_write", tokens=length, dim=cfg.dim)
            table = Path(args.table) if args.table else None
            dispatch[op] = ops.write_dispatch_table(op, torch.cuda.get_device_name(device), timed, meta, table)
    src = torch.empty(length * cfg.dim * 4, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    rows.append({"provider": "copy", "ms": ms, "gbps": 2 * src.numel() * 2 / ms / 1e6})
    print(f"copy (same order of bytes) {ms:8.4f} ms {2 * src.numel() * 2 / ms / 1e6:8.1f} GB/s")
    if device.type != "cuda":
        return {"rows": rows}
    results = {"tokens": length, "dim": cfg.dim, "heads": cfg.num_heads, "rows": rows, "dispatch": dispatch}
    print("dispatch table:", dispatch)
    print("saved", save("bench_cache_write", device, results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
