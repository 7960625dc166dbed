"""Training entry point (one process, or many under torchrun).

python -m train all --recipe toy --out runs/toy          # every stage in order, then the evaluation
python -m train teacher --recipe toy --out runs/toy      # one stage (resumes from its last checkpoint)
torchrun --nproc_per_node=2 -m train all --recipe smoke --out /tmp/smoke
python -m train eval --recipe toy --out runs/toy         # long-horizon evaluation: table and plots
python -m train ship --recipe smoke --out /tmp/smoke --to /tmp/model   # package one student as a model directory
python -m train ship --recipe toy --out runs/toy         # WRITES INTO THE REPOSITORY: the shipped models, README
torchrun --nproc_per_node=8 -m train all --recipe wan2.1-1.3b --wan-dir Wan2.1-T2V-1.3B --prompts prompts.txt \
    --out runs/wan [--checkpoint self_forcing_dmd.pt]    # from Wan2.1's weights: the paper's setting (bf16)
python -m train extended --recipe wan2.1-1.3b ... --accumulate 8 --lora-rank 64   # batch 8 on one GPU, LoRA

Every command writes into --out (the run directory) and nowhere else, except `ship` without --to, which writes into
the repository: the three shipped models (sfpp/assets/default, self-forcing, self-forcing++-grpo) and the README's
evaluation table, only from a run of the `toy` recipe, only into a git checkout's own sfpp/ (never an installed
package), each model written beside the old one and swapped in whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from train.common import info, init_distributed
from train.config import RECIPES, get_recipe
from train.stages import STAGES, run_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=[*STAGES, "all", "eval", "ship"])
    p.add_argument("--recipe", default="toy", choices=sorted(RECIPES))
    p.add_argument("--out", default="runs/toy", help="run directory (stages resume from it)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--stop-after", type=int, default=None, help="stop a stage after this many steps (tests)")
    p.add_argument(
        "--to",
        "--ship-to",
        dest="ship_to",
        metavar="DIR",
        default=None,
        help="ship: write one student (--ship-stage) as a model directory DIR, and nothing into the repository",
    )
    p.add_argument(
        "--ship-stage",
        default="extended",
        choices=["extended", "grpo", "dmd"],
        help="which student `ship --to DIR` packages (default: the Self-Forcing++ EMA student)",
    )
    p.add_argument("--wan-dir", default=None, help="wan2.1-1.3b: the Wan2.1 directory (Wan's or diffusers' layout)")
    p.add_argument("--prompts", default=None, help="wan2.1-1.3b: prompt file, one prompt a line")
    p.add_argument("--checkpoint", default=None, help="wan2.1-1.3b: a Self-Forcing student instead of ODE init")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (default: recipe's)")
    p.add_argument("--accumulate", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lora-rank", type=int, default=None, help="peft LoRA rank of the DMD/GRPO models (0: full)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default: alpha = rank)")
    p.add_argument(
        "--checkpoint-every", type=int, default=None, help="activation checkpointing of every k-th block (0: none)"
    )
    args = p.parse_args(argv)
    if args.ship_to and args.command != "ship":
        p.error("--to belongs to `ship`: `all` trains and evaluates, and ships nothing")

    if "SFPP_THREADS" in os.environ:  # small models on a busy CPU run faster on one thread than on two
        torch.set_num_threads(int(os.environ["SFPP_THREADS"]))
    training = {"dtype": args.dtype, "accumulate": args.accumulate, "lora_rank": args.lora_rank,
                "lora_alpha": args.lora_alpha, "checkpoint_blocks": args.checkpoint_every}  # fmt: skip
    training = {k: v for k, v in training.items() if v is not None}
    try:
        recipe, out = get_recipe(args.recipe, **training), Path(args.out)
    except ValueError as exc:
        p.error(str(exc))
    wan_args = {"wan_dir": args.wan_dir, "prompt_file": args.prompts, "student_checkpoint": args.checkpoint}
    if recipe.wan:
        recipe = get_recipe(args.recipe, **training, **{k: str(Path(v).resolve()) for k, v in wan_args.items() if v})
    elif any(wan_args.values()):
        p.error(f"--wan-dir, --prompts and --checkpoint belong to the wan recipes, not {args.recipe!r}")
    env = init_distributed(args.device)
    stages = STAGES if args.command == "all" else (args.command,) if args.command in STAGES else ()
    for name in stages:
        start = time.time()
        run_stage(name, recipe, out, env, stop_after=args.stop_after)
        info(env, f"[{name}] {time.time() - start:.0f} s")
    if env.world_size > 1:  # the rest is single-process work: leave the group first, no rank idles in a collective
        import gc

        import torch.distributed as dist

        gc.collect()  # free the sharded modules (and their device mesh) while the group still exists
        dist.barrier()
        dist.destroy_process_group()
    if env.is_main and recipe.wan and args.command in ("eval", "ship", "all"):
        info(env, f"{args.command} is for the toy world; the Wan students are {out}/extended/final/ema.safetensors "
             "and grpo/final/policy.safetensors (Pipeline.from_pretrained(wan_dir, checkpoint=...))")  # fmt: skip
    elif env.is_main:
        if args.command in ("eval", "all"):
            from train.evaluate import evaluate

            evaluate(recipe, out, env.device)
        if args.command == "ship":
            from train.ship import ShipError, ship, ship_all

            try:
                if args.ship_to:
                    ship(recipe, out, Path(args.ship_to), stage=args.ship_stage)
                else:
                    ship_all(recipe, out)
            except (ShipError, FileNotFoundError) as exc:
                print(f"python -m train: error: {exc}", file=sys.stderr)
                return 2
    if env.world_size > 1:
        # All work is written. Under torchrun with gloo, the interpreter's own teardown aborted a rank now and then
        # ("terminate called without an active exception", SIGABRT) after everything had finished, which fails the
        # whole launch; leaving without running C++ static destructors avoids it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
