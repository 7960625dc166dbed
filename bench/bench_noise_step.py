"""Fused sampler step with in-kernel noise: ours (triton, cuda) against the torch path (torch.randn + two
elementwise ops, as sfpp.sampler does) and the copy bandwidth measured in the same run, at a Wan 1.3B chunk
(latents [1, 16, 3, 60, 104]) and a larger batch.

    python -m bench.bench_noise_step

GB/s counts the bytes the fused op must move: read x and the flow (fp32), write x0 and x_next (fp32). Needs a CUDA
GPU; on a CPU it runs a tiny smoke configuration (torch, Triton interpreter) and saves nothing.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from bench.bench_ring_attention import bench_ms
from bench.common import save


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (16, 3, 60, 104)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run at a tiny size (torch, Triton interpreter); nothing saved")
        shape, args.batches = (4, 2, 4, 4), [1]
    from sfpp import ops

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *shape, device=device)
        flow = torch.randn_like(x)
        moved = 4 * x.numel() * 4
        fns = {
            b: partial(ops.noise_step, x, flow, 0.9, 0.7, 1, 0, backend=b) for b in ops.available("noise_step", device)
        }
        fns["torch-eager-randn"] = partial(lambda x, flow: (x - 0.9 * flow) * 0.3 + 0.7 * torch.randn_like(x), x, flow)
        for name, fn in fns.items():
            fn()
            ms = bench_ms(fn, device)
            rows.append({"provider": name, "batch": batch, "ms": ms, "gbps": moved / ms / 1e6})
            print(f"batch {batch} {name:18s} {ms:8.4f} ms {moved / ms / 1e6:8.1f} GB/s")
        dst = torch.empty_like(x)
        ms = bench_ms(partial(dst.copy_, x), device)
        rows.append({"provider": "copy", "batch": batch, "ms": ms, "gbps": 2 * x.numel() * 4 / ms / 1e6})
        print(f"batch {batch} {'copy':18s} {ms:8.4f} ms {2 * x.numel() * 4 / ms / 1e6:8.1f} GB/s")
    if device.type != "cuda":
        return {"rows": rows}
    results = {"shape": [None, *shape], "rows": rows}
    print("saved", save("bench_noise_step", device, results, Path(args.out_dir) if args.out_dir else None))
    return results


if __name__ == "__main__":
    main()
