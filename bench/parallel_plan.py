"""The context-parallel plan in numbers: bytes each rank sends per chunk for Ulysses and for ring attention, their
time on NVLink and PCIe against the compute per rank, and the predicted milliseconds per chunk, for Wan2.1-1.3B and
14B at 832x480. A model, not a measurement (no multi-GPU run has been made here): the formulas are below, and
tests/test_parallel_plan.py checks the Ulysses bytes against what `sfpp.engine.parallel` really sends.

    python -m bench.parallel_plan                 # print the doc
    python -m bench.parallel_plan --write         # and write bench/results/parallel_plan.md

Per chunk: `forwards` DiT forwards (4 denoising steps + 1 context pass, Self-Forcing's), each over L = Fc*T tokens
(3 latent frames x 1560 tokens at 832x480) attending to `keys` = (sink + window)*T ring rows (the full ring, the steady
state; 21 frames) plus 512 text tokens; activations and K/V in bf16 (2 bytes).

Ulysses (implemented): per layer and forward, one all-to-all of q, k, v and one of the output. A rank holds L/N tokens
of width dim per tensor and keeps 1/N of it: it sends 4 * (L/N) * dim * 2 * (N-1)/N bytes; plus one all-gather of the
head's output per forward ((L/N) * 64 channels * 2 bytes to each of N-1 ranks). On the critical path (not
overlapped): time = bytes / bandwidth.

Ring attention (the alternative; not implemented): q stays with its L/N tokens, the ring cache is sharded by rows
(1/N of the KV memory as well) and every rank's K/V shard visits every other rank, per layer and forward: each rank
sends (N-1) * (keys/N) * dim * 2 (K and V) * 2 bytes. It can overlap with the attention it feeds, so its time is
max(send, attention compute), but it grows with the window, while Ulysses' does not.

Compute: 2 FLOPs per multiply-add of the projections (q, k, v, o; cross-attention q, o), the FFN, self-attention
(QK^T and PV over the ring) and cross-attention over the text, per rank 1/N of it, at an assumed `tflops` effective
bf16 throughput (default 400: about 40% of an H100's 989 dense TFLOPS; a parameter, not a measurement). Not counted:
adaLN, norms, RoPE, the decoder (replicated on every rank), kernel launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.common import parser
from sfpp.models.dit import CONFIGS, WanConfig

LINKS = {"NVLink (900 GB/s)": 900e9, "PCIe Gen5 x16 (~55 GB/s)": 55e9}
DEGREES = (2, 4, 8)
MODELS = ("wan2.1-1.3b", "wan2.1-14b")
OUT = Path(__file__).parent / "results" / "parallel_plan.md"


@dataclass(frozen=True)
class Shape:
    """One chunk's shape: `frame_tokens` per latent frame, `frames` per chunk, ring `keys` rows, text tokens."""

    frame_tokens: int = 52 * 30  # 832x480: latents 104x60, patches of 2x2
    frames: int = 3
    ring_frames: int = 21  # sink + window
    text_tokens: int = 512
    forwards: int = 5  # 4 denoising steps + the context pass
    bytes_per_value: int = 2  # bf16

    @property
    def tokens(self) -> int:
        return self.frames * self.frame_tokens

    @property
    def keys(self) -> int:
        return self.ring_frames * self.frame_tokens


def ulysses_bytes_per_forward(cfg: WanConfig, shape: Shape, n: int) -> float:
    """Bytes one rank sends in one DiT forward under Ulysses over n ranks."""
    share = shape.tokens / n * shape.bytes_per_value
    per_layer = 4 * share * cfg.dim * (n - 1) / n  # q, k, v in; the output back
    channels = cfg.out_channels * cfg.patch_size[1] * cfg.patch_size[2]
    gather = share * channels * (n - 1)  # the head's output to every other rank
    return cfg.num_layers * per_layer + gather


def ring_bytes_per_forward(cfg: WanConfig, shape: Shape, n: int) -> float:
    """Bytes one rank sends in one DiT forward under ring attention over n ranks (K/V shards around the ring)."""
    return cfg.num_layers * (n - 1) * shape.keys / n * cfg.dim * 2 * shape.bytes_per_value


def flops_per_forward(cfg: WanConfig, shape: Shape) -> tuple[float, float]:
    """(all FLOPs, self-attention's FLOPs) of one forward on one device."""
    L, d = shape.tokens, cfg.dim
    linear = 2 * L * (6 * d * d + 2 * d * cfg.ffn_dim)  # q k v o, cross q o, FFN up and down
    self_attn = 4 * L * shape.keys * d  # QK^T and PV
    cross = 4 * L * shape.text_tokens * d
    return cfg.num_layers * (linear + self_attn + cross), cfg.num_layers * self_attn


def weight_bytes(cfg: WanConfig, bytes_per_value: int = 2) -> int:
    import torch

    from sfpp.models.dit import WanModel

    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(cfg).parameters()) * bytes_per_value


def kv_bytes(cfg: WanConfig, shape: Shape) -> int:
    """The ring's self-attention K and V on one device."""
    return cfg.num_layers * shape.keys * cfg.dim * 2 * shape.bytes_per_value


def plan_rows(tflops: float = 400.0, shape: Shape | None = None) -> list[dict]:
    """One row per (model, N, scheme, link): MB sent per chunk per rank, ms of communication, ms of compute per
    rank, predicted ms per chunk (None where the scheme does not apply: Ulysses needs N to divide the heads)."""
    shape = shape or Shape()
    rows = []
    for name in MODELS:
        cfg = CONFIGS[name]
        flops, attn = flops_per_forward(cfg, shape)
        single_ms = shape.forwards * flops / (tflops * 1e12) * 1e3
        for n in DEGREES:
            compute_ms = single_ms / n
            attn_ms = shape.forwards * attn / n / (tflops * 1e12) * 1e3
            for scheme in ("ulysses", "ring"):
                ok = scheme == "ring" or cfg.num_heads % n == 0
                per_forward = (ulysses_bytes_per_forward if scheme == "ulysses" else ring_bytes_per_forward)(
                    cfg, shape, n
                )
                sent = shape.forwards * per_forward
                for link, bandwidth in LINKS.items():
                    comm_ms = sent / bandwidth * 1e3
                    if scheme == "ulysses":
                        total = compute_ms + comm_ms
                    else:  # the K/V pass hides behind attention; what exceeds it adds up
                        total = compute_ms + max(0.0, comm_ms - attn_ms)
                    rows.append({
                        "model": name, "n": n, "scheme": scheme, "link": link, "ok": ok, "mb": sent / 1e6,
                        "comm_ms": comm_ms, "compute_ms": compute_ms, "single_ms": single_ms,
                        "chunk_ms": total if ok else None,
                    })  # fmt: skip
    return rows


def doc(tflops: float = 400.0) -> str:
    shape = Shape()
    rows = plan_rows(tflops, shape)
    lines = [
        "# Context parallel: the plan in numbers",
        "",
        f"Generated by `python -m bench.parallel_plan --write` (the formulas are in its docstring). One chunk at "
        f"832x480: {shape.frames} latent frames x {shape.frame_tokens} tokens, a ring of {shape.ring_frames} frames "
        f"({shape.keys} keys), {shape.forwards} forwards (4 steps + the context pass), bf16; compute at an assumed "
        f"{tflops:g} effective TFLOPS per GPU. A model, not a measurement: no multi-GPU run has been made for it.",
        "",
        "Ulysses is what `sfpp.engine.parallel` implements (N must divide the heads: 12 at 1.3B, so not 8; 40 at "
        "14B). Ring attention is the alternative it was chosen over: its traffic grows with the window and is "
        "several times Ulysses' here, though it can hide behind the attention it feeds. Over NVLink the two predict "
        "within ~2% of each other (Ulysses' all-to-alls are not overlapped); over PCIe the ring's K/V no longer hide "
        "and Ulysses is the faster by far. Ulysses also leaves the ring-attention kernels and the captured chunk "
        "unchanged (each rank attends over all tokens of its heads), where ring attention needs a second softmax "
        "merge per hop. Where N does not divide the heads (1.3B at 8), a 2-D split (Ulysses x ring) would be next.",
        "",
        "| model | N | scheme | MB sent / rank / chunk | link | comm ms | compute ms / rank | predicted ms / chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chunk = f"{r['chunk_ms']:.0f}" if r["ok"] else f"n/a ({r['n']} does not divide the heads)"
        lines.append(
            f"| {r['model']} | {r['n']} | {r['scheme']} | {r['mb']:.0f} | {r['link']} | {r['comm_ms']:.1f} | "
            f"{r['compute_ms']:.0f} | {chunk} |"
        )
    singles = {r["model"]: r["single_ms"] for r in rows}
    lines += [
        "",
        "On one GPU: " + ", ".join(f"{m} {ms:.0f} ms per chunk" for m, ms in singles.items()) + " (same assumptions).",
        "NVLink's 900 GB/s is H100's both directions together; an all-to-all sends and receives at once, so one "
        "direction's 450 GB/s would double the NVLink communication times (still small beside compute).",
        "Memory per rank: the weights are whole on every rank ("
        + ", ".join(f"{m}: {weight_bytes(CONFIGS[m]) / 1e9:.1f} GB" for m in MODELS)
        + " in bf16); the ring's self-attention K/V is 1/N of ("
        + ", ".join(f"{m}: {kv_bytes(CONFIGS[m], shape) / 1e9:.1f} GB" for m in MODELS)
        + f" at {shape.ring_frames} frames); the text K/V is whole on every rank.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, writes="With --write, writes into the repository: bench/results/parallel_plan.md (the doc "
               "printed; without --write nothing is written).")  # fmt: skip
    p.add_argument("--tflops", type=float, default=400.0, help="effective bf16 TFLOPS per GPU (default 400)")
    p.add_argument("--write", action="store_true", help="also write bench/results/parallel_plan.md")
    args = p.parse_args(argv)
    text = doc(args.tflops)
    print(text)
    if args.write:
        OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
