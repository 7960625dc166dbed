"""Fused adaLN modulate (LayerNorm + per-frame shift/scale + cast, `sfpp.engine.ops.adaln_modulate`): ours (triton)
against the torch reference (the model's own eager path) and a plain copy of the same bytes (x fp32 -> out dtype)
measured in the same run, at a Wan 1.3B chunk (B=1, 3 frames x 1560 tokens, D=1536, bf16 out) and a larger batch.

    python -m bench.bench_adaln

GB/s counts the bytes the fused op must move: read x (fp32), write the output (bf16 by default); the shift/scale
rows are under 0.1% of that and not counted. Records the fastest backend at the first batch size for this GPU model in
`sfpp/engine/dispatch_table.json`, which `backend="auto"` reads (`--table` elsewhere, `--no-table` to leave it). Needs a
CUDA GPU; on a CPU it runs a tiny smoke configuration (torch, Triton interpreter) and saves nothing.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from bench.bench_ring_attention import bench_ms
from bench.common import WRITES_GPU, dispatch_meta, parser, save

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, WRITES_GPU)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--tokens", type=int, default=1560, help="tokens per latent frame (480x832: 30x52)")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype (the weights')")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--table", default=None, help="dispatch table to update (default: sfpp/engine/dispatch_table.json)")
    p.add_argument("--no-table", action="store_true", help="do not record the fastest backend")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run at a tiny size (torch, Triton interpreter); nothing saved")
        args.batches, args.frames, args.tokens, args.dim = [1], 2, 5, 48
    from sfpp.engine import ops

    dtype = DTYPES[args.dtype]
    rows, timed = [], {}
    for batch in args.batches:
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(batch, args.frames * args.tokens, args.dim, generator=g, device=device)  # [B, F*L, D] fp32
        e = torch.randn(batch, args.frames, 6, args.dim, generator=g, device=device)  # [B, F, 6, D] as in a block
        shift, scale = e.chunk(6, dim=2)[:2]  # [B, F, 1, D] strided views, as the model passes them
        moved = x.numel() * (4 + dtype.itemsize)
        fns = {
            b: partial(ops.adaln_modulate, x, shift, scale, 1e-6, dtype, backend=b)
            for b in ops.available("adaln_modulate", device)
        }
        fns["copy"] = partial(torch.empty_like(x, dtype=dtype).copy_, x)  # the same bytes, no math
        for name, fn in fns.items():
            fn()
            ms = bench_ms(fn, device)
            rows.append({"provider": name, "batch": batch, "ms": ms, "gbps": moved / ms / 1e6})
            if batch == args.batches[0] and name != "copy":
                timed[name] = ms
            print(f"batch {batch} {name:8s} {ms:8.4f} ms {moved / ms / 1e6:8.1f} GB/s")
    if device.type != "cuda":
        return {"rows": rows}
    results = {"shape": [None, args.frames * args.tokens, args.dim], "dtype": args.dtype, "rows": rows}
    if not args.no_table:
        meta = dispatch_meta("bench_adaln", batch=args.batches[0], tokens=args.frames * args.tokens, dim=args.dim)
        table = Path(args.table) if args.table else None
        results["dispatch"] = {"adaln_modulate": ops.write_dispatch_table(
            "adaln_modulate", torch.cuda.get_device_name(device), timed, meta, table)}  # fmt: skip
        print("dispatch table:", results["dispatch"])
    print("saved", save("bench_adaln", device, results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
