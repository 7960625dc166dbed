"""The five stages of Self-Forcing++ (Algorithm 1 and appendix A.5-A.6), each resumable from its checkpoints.

teacher   -> bidirectional DiT + text encoder, flow matching on clips of `horizon` latent frames, CFG dropout
ode       -> block-causal student regressed onto the teacher's ODE trajectories at its 4 timesteps (eq. 4)
dmd       -> Self-Forcing: rollouts of `horizon` frames through the ring cache, DMD (eq. 3) with a fake-score critic
extended  -> Self-Forcing++: rollouts of N >> horizon frames, DMD on a uniformly drawn window (eq. 1-2)
grpo      -> GRPO with an optical-flow smoothness reward (eq. 5-7)

Stage outputs live in <out>/<stage>/final/ (weights, metrics.json, DONE); checkpoints in <out>/<stage>/ckpt/.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfpp.engine.cache import RingKVCache
from sfpp.engine.sampler import FlowMatchSchedule, flow_to_x0
from sfpp.models.dit import WanModel
from sfpp.models.text import ByteTextEncoder
from sfpp.models.toy import PatchPCACodec
from train import rollout as R
from train.common import (
    EMA,
    Dist,
    Logger,
    compute_dtype,
    full_state_dict,
    info,
    load_checkpoint,
    load_full_state_dict,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
    shard,
    weights_checksum,
    write_json,
)
from train.config import DMD_FIELDS, DMDConfig, Recipe
from train.lora import add_lora, plain_state_dict
from train.metrics import smoothness_reward
from train.world import render_batch, sample_spec

STAGES = ("teacher", "ode", "dmd", "extended", "grpo")
SHARED_STREAM = 4099  # seeds the generator every rank shares, as if it were a rank no run has


def world_codec(recipe: Recipe) -> PatchPCACodec:
    """The toy latent codec: principal components of the world's pixel blocks, fitted on 512 frames
    (deterministic, so every rank and stage gets the same codec)."""
    frames = [
        render_batch(list(range(10**6 + 16 * i, 10**6 + 16 * i + 16)), 4, recipe.frame_size, start=7 * i)[0]
        for i in range(8)
    ]
    return PatchPCACodec.fit(
        torch.cat(frames).flatten(0, 1), recipe.codec_factor, recipe.model.in_channels, recipe.codec_whitening
    )


def data_seeds(step: int, rank: int, world_size: int, batch: int, salt: int) -> list[int]:
    """Clip seeds for one step: disjoint across (virtual) ranks, steps and stages, the same after a resume."""
    base = ((salt * 1_000_003 + step) * world_size + rank) * batch
    return [base + i for i in range(batch)]


def world_prompts(seeds: list[int]) -> list[str]:
    return [sample_spec(s).prompt() for s in seeds]


def load_module(module: nn.Module, path: Path) -> nn.Module:
    from sfpp.models.checkpoint import load_file, load_weights

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that produces it first")
    return load_weights(module, load_file(path), source=str(path))


class Stage:
    name = ""

    @property
    def salt(self) -> int:
        """Distinguishes the stages' random streams and data."""
        return STAGES.index(self.name) if self.name in STAGES else len(STAGES)

    def __init__(self, recipe: Recipe, out: Path, env: Dist) -> None:
        self.recipe, self.out, self.env = recipe, Path(out), env
        self.dir = self.out / self.name
        self.dtype = compute_dtype(recipe.dtype)
        if recipe.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {recipe.accumulate}")
        # Gradient accumulation as virtual ranks: micro-batch k of rank r is virtual rank r * K + k of a world of
        # world_size * K, with that rank's data and random stream. So K micro-batches on W processes compute what
        # W * K processes would (the same samples, the same noise; the window draws are shared anyway), and 1 x 8,
        # 2 x 4, 4 x 2 and 8 x 1 are one run. K = 1 is the plain data-parallel run.
        self.accumulate = recipe.accumulate
        self.vranks = [env.rank * self.accumulate + k for k in range(self.accumulate)]
        self.vworld = env.world_size * self.accumulate
        self.micro = 0  # the micro-batch being computed: picks its virtual rank's generator and data
        if recipe.wan:
            from train.wan import VAEFrames

            self.codec = VAEFrames(recipe, env.device)  # pixels only where needed: GRPO's reward
        else:
            self.codec = world_codec(recipe)
        self.schedule = recipe.schedule
        # Two random streams. `generator` differs per rank: noise, data, noise levels. `shared` is seeded the same on
        # every rank and draws everything that decides how many forward passes a step makes (window starts, exit
        # and restart steps): under FSDP each of those passes is a collective per block, so ranks that drew
        # differently would pair up wrong all-gathers and hang.
        seed = recipe.seed * 1000 + self.salt
        self.generators = [torch.Generator().manual_seed(seed + 7919 * v) for v in self.vranks]
        self.shared = torch.Generator().manual_seed(recipe.seed * 1000 + self.salt + 7919 * SHARED_STREAM)
        self.draws: list[tuple] = []  # every shared draw made, compared across ranks at the end
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0  # wall time of the steps so far, over every resume
        self.models: dict[str, nn.Module] = {}  # checkpointed, sharded
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # keyed like their model
        self.ema: EMA | None = None
        self.rollouts: dict[str, R.RolloutModel] = {}  # trained model name -> its rollout copy
        self.pool: dict[tuple, tuple[RingKVCache, R.ChunkRunner]] = {}  # reused caches and their chunk runners
        self.setup()

    # --- to implement
    total_steps = 0

    def setup(self) -> None:
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def outputs(self) -> dict[str, dict[str, Tensor]]:
        """Full weights the next stages load, by file name (collective)."""
        raise NotImplementedError

    # --- shared machinery

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def generator(self) -> torch.Generator:
        """The random stream of the current micro-batch's virtual rank."""
        return self.generators[self.micro]

    def micro_batches(self):
        """Iterate over this rank's micro-batches (virtual ranks), the current one in `self.micro`."""
        for k in range(self.accumulate):
            self.micro = k
            yield k
        self.micro = 0

    def mean_losses(self, losses: dict[str, float]) -> dict[str, float]:
        """This rank's losses (each already a mean over its micro-batches) averaged over the ranks: the loss of the
        whole batch, the same number on every rank and for every split of it into processes and micro-batches."""
        if self.env.world_size == 1:
            return losses
        values = torch.tensor(list(losses.values()), dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.env.world_size for k, v in zip(losses, values.tolist(), strict=True)}

    def sharded(self, model: nn.Module, forward_methods: tuple[str, ...] = ()) -> nn.Module:
        return shard(model, self.env, forward_methods, dtype=self.recipe.dtype)

    def with_lora(self, model: WanModel) -> WanModel:
        """The recipe's LoRA on a DMD/GRPO model (generator, critic, policy), or the model itself (rank 0)."""
        return add_lora(model, self.recipe.lora_rank, self.recipe.lora_alpha) if self.recipe.lora_rank else model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def plain(self, sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """A trained model's full state dict as a plain WanModel's (LoRA merged): what the stages write."""
        return plain_state_dict(sd, model, self.recipe.lora_alpha, self.recipe.lora_rank)

    def rollout_model(self, name: str) -> R.RolloutModel:
        if name not in self.rollouts:
            lora = (self.recipe.lora_rank, self.recipe.lora_alpha)
            self.rollouts[name] = R.RolloutModel(self.models[name], self.dtype, self.device, lora)
        return self.rollouts[name]

    def frozen_text(self) -> ByteTextEncoder:
        if self.recipe.wan:
            from train.wan import PromptTable

            return PromptTable(self.out, self.device)
        text = ByteTextEncoder(self.recipe.text)
        load_module(text, self.out / "teacher" / "final" / "text.safetensors")
        return text.to(self.device).eval().requires_grad_(False)

    def frozen_teacher(self) -> WanModel:
        """The real score, whole on every rank, in the compute dtype (nothing trains it: no master weights)."""
        if self.recipe.wan:
            from train import wan

            return wan.teacher(self.recipe, self.device).to(self.dtype)
        teacher = load_module(WanModel(self.recipe.model), self.out / "teacher" / "final" / "teacher.safetensors")
        return teacher.to(self.device, self.dtype).eval().requires_grad_(False)

    def trainable(self, model: WanModel) -> WanModel:
        model.checkpoint_blocks = self.recipe.checkpoint_blocks
        return model.to(self.device)

    def encode(self, text: ByteTextEncoder, prompts: list[str]) -> Tensor:
        if self.recipe.wan:
            return text.lookup(prompts)
        return text(text.tokenize(prompts).to(self.device))

    def prompts(self, step: int, batch: int, salt: int) -> list[str]:
        """This rank's prompts for a step: the world's (toy), or the prompt file's (Wan)."""
        seeds = data_seeds(step, self.vranks[self.micro], self.vworld, batch, salt)
        return self.text.pick(seeds) if self.recipe.wan else world_prompts(seeds)

    def world_batch(self, step: int, batch: int, frames: int) -> tuple[Tensor, list[str]]:
        seeds = data_seeds(step, self.vranks[self.micro], self.vworld, batch, self.salt)
        video, prompts = render_batch(seeds, frames, self.recipe.frame_size, start=int(seeds[0] % 97))
        return self.codec.encode(video).to(self.device), prompts

    def chunk_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.recipe.latent_hw
        return (batch, self.recipe.model.in_channels, self.recipe.frames_per_chunk, h, w)

    def new_cache(
        self,
        model: WanModel,
        batch: int,
        ctx: Tensor,
        rollout: R.RolloutModel,
        schedule: FlowMatchSchedule | None = None,
        layout: tuple[int, int] | None = None,
    ) -> tuple[RingKVCache, R.ChunkRunner]:
        """A ring cache in the compute dtype holding the prompts' text K/V, and the chunk runner of `rollout`'s model
        bound to it. Kept per batch size and reset for the next rollout, as the pipeline reuses a stream's
        state: a runner's CUDA graphs are captured once per fill level, not once per rollout. Keyed by the rollout
        model too: a runner is bound to its model. `schedule`: the runner's, if not the recipe's (a shipped model's);
        `layout`: (window, sink) frames of the cache, if not the recipe's."""
        schedule = schedule or self.schedule
        window, sink = layout or (self.recipe.window, self.recipe.sink)
        key = (rollout, batch, schedule, window, sink)
        if key not in self.pool:
            h, w = self.recipe.latent_hw
            tokens = (h // model.cfg.patch_size[1]) * (w // model.cfg.patch_size[2])
            cache = RingKVCache(
                model.cfg, batch_size=batch, frame_tokens=tokens, window=window, sink=sink, dtype=self.dtype,
                device=self.device,
            )  # fmt: skip
            runner = R.ChunkRunner(rollout.get(), cache, schedule, cuda_graph=rollout.cuda_graph)
            self.pool[key] = (cache, runner)
        cache, runner = self.pool[key]
        rollout.get()  # a stale copy is refreshed in place: the same module, the runner's graphs stay valid
        cache.reset()
        with torch.no_grad():
            cache.set_text(model.text_kv(ctx))
        return cache, runner

    def save(self, step: int) -> None:
        weights = {name: full_state_dict(m) for name, m in self.models.items()}
        if self.ema is not None:
            weights["ema"] = self.ema.full_state_dict()
        state = {
            "step": step,
            "history": self.history,
            "optimizers": {k: optimizer_state(self.models[k], o) for k, o in self.optimizers.items()},
            "generators": _gather([g.get_state() for g in self.generators], self.env),
            "shared": self.shared.get_state(),
            "draws": self.draws,
            "seconds": self.seconds,
            "recipe": asdict(self.recipe),
        }
        save_checkpoint(self.dir / "ckpt", step, weights, state, self.env)
        _barrier(self.env)

    def resume(self) -> int:
        names = list(self.models) + (["ema"] if self.ema is not None else [])
        found = load_checkpoint(self.dir / "ckpt", names)
        if found is None:
            return 0
        weights, state = found
        from sfpp.models.checkpoint import CheckpointError

        # A name is a label. A recipe field added since the checkpoint was written takes its default, which keeps the
        # behaviour from before the field existed.
        defaults = {f.name: f.default for f in fields(self.recipe) if f.default is not MISSING}
        saved, now = {**defaults, **state["recipe"], "name": None}, {**asdict(self.recipe), "name": None}
        field = DMD_FIELDS.get(self.name)
        if field is not None and state["step"] <= self.total_steps:
            # The DMD stages' learning rate is constant: a shorter run's checkpoint is the longer run's at that step,
            # so they may train on past the steps it was written with (train.budget's 1x -> 4x -> 8x).
            saved = {**saved, field: {**saved[field], "steps": now[field]["steps"]}}
        if saved != now:
            raise CheckpointError(f"{self.dir / 'ckpt'} was written by a different recipe; use another --out")
        for name, model in self.models.items():
            load_full_state_dict(model, weights[name], source=f"{self.dir / 'ckpt'} [{name}]")
        for name, optim in self.optimizers.items():
            load_optimizer_state(self.models[name], optim, state["optimizers"][name])
        if self.ema is not None:
            self.ema.load_full(weights["ema"])
        for g, saved in zip(self.generators, state["generators"][self.env.rank], strict=True):
            g.set_state(saved)
        self.shared.set_state(state["shared"])
        self.draws = state["draws"]
        self.history = state["history"]
        self.seconds = state.get("seconds", 0.0)
        info(self.env, f"[{self.name}] resumed at step {state['step']}")
        return state["step"]

    def run(self, stop_after: int | None = None) -> list[dict[str, float]]:
        """Train to the end (or, to simulate a crash in tests, stop after `stop_after` steps)."""
        done_marker = self.dir / "final" / "DONE"
        if done_marker.is_file():
            info(self.env, f"[{self.name}] already done: {done_marker.parent}")
            return json.loads((self.dir / "final" / "metrics.json").read_text())["history"]
        start = self.resume()
        logger = Logger(self.env, self.name, self.total_steps, start, self.recipe.log_every)
        for step in range(start, self.total_steps):
            began = time.time()
            losses = self.step(step)
            for model in self.models.values():  # FSDP2 keeps the root gathered after a forward with no backward
                if hasattr(model, "reshard"):
                    model.reshard()
            self.history.append(losses)
            self.seconds += time.time() - began
            logger.log(step, losses)
            if (step + 1) % self.recipe.ckpt_every == 0 or step + 1 == self.total_steps:
                self.save(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                logger.close()
                return self.history
        logger.close()
        self.finish()
        return self.history

    def finish(self) -> None:
        from safetensors.torch import save_file

        # Each rank's own fingerprint, computed before any collective: its shared draws and its shared generator.
        # (Under FSDP the weights exist once, sharded, and cannot drift apart; the draws can.)
        own = {"draws": _digest(self.draws), "shared": _digest(self.shared.get_state().tolist())}
        fingerprints = _gather(own, self.env)
        outputs = self.outputs()
        checksums = _gather({name: weights_checksum(m) for name, m in self.models.items()}, self.env)
        if self.env.is_main:
            if any(f != fingerprints[0] for f in fingerprints):
                raise RuntimeError(f"[{self.name}] ranks made different shared draws: {fingerprints}")
            if any(c != checksums[0] for c in checksums):
                raise RuntimeError(f"[{self.name}] ranks disagree on the weights: {checksums}")
            final = self.dir / "final"
            final.mkdir(parents=True, exist_ok=True)
            for file, sd in outputs.items():
                save_file({k: v.contiguous() for k, v in sd.items()}, str(final / f"{file}.safetensors"))
            metrics = {
                "history": self.history,
                "seconds": round(self.seconds, 1),
                "threads": torch.get_num_threads(),
                "rank_checksums": checksums,
                "rank_fingerprints": fingerprints,
            }
            write_json(final / "metrics.json", metrics, self.env)
            (final / "DONE").write_text("ok\n")
        _barrier(self.env)
        info(self.env, f"[{self.name}] done -> {self.dir / 'final'}")


def _gather(obj, env: Dist) -> list:
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def _barrier(env: Dist) -> None:
    if env.world_size > 1:
        torch.distributed.barrier()


def _adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _clip_and_step(model: nn.Module, optim: torch.optim.Optimizer, max_norm: float | None) -> float:
    """Clip the gradient's global norm (across ranks under FSDP), step; returns the norm before clipping."""
    if hasattr(model, "reshard"):  # the root stays gathered after the context passes that follow the last backward
        model.reshard()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm else float("inf"))
    optim.step()
    return float(norm.full_tensor() if isinstance(norm, torch.distributed.tensor.DTensor) else norm)


# ------------------------------------------------------------------------------------------------ stages


class TeacherStage(Stage):
    """Flow matching: v = noise - x0 at sigma ~ shift(U(0, 1)); prompts dropped to "" for CFG."""

    name = "teacher"

    def setup(self) -> None:
        cfg = self.recipe.teacher
        self.total_steps = cfg.steps
        torch.manual_seed(self.recipe.seed)
        dit = self.sharded(self.trainable(WanModel(self.recipe.model)))
        text = self.sharded(ByteTextEncoder(self.recipe.text).to(self.device))
        self.models = {"teacher": dit, "text": text}
        self.optimizers = {"teacher": _adamw(dit.parameters(), cfg.lr), "text": _adamw(text.parameters(), cfg.lr)}
        self.ema = EMA(dit, cfg.ema_decay) if cfg.ema_decay else None

    def step(self, step: int) -> dict[str, float]:
        cfg = self.recipe.teacher
        lr_scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for optim in self.optimizers.values():
            for group in optim.param_groups:
                group["lr"] = cfg.lr * lr_scale
            optim.zero_grad(set_to_none=True)
        total = 0.0
        for _ in self.micro_batches():
            z, prompts = self.world_batch(step, cfg.batch_size, self.recipe.horizon)
            drop = torch.rand(len(prompts), generator=self.generator) < cfg.cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
            sigma = R.sample_sigma(len(prompts), self.generator, 0.0, 1.0, cfg.train_shift)
            x_t, noise = R.noisy(z, sigma, self.generator)
            ctx = self.encode(self.models["text"], prompts)
            flow = self.models["teacher"](x_t, (1000 * sigma).to(self.device), ctx)
            loss = F.mse_loss(flow, noise - z)
            (loss / self.accumulate).backward()  # the gradient of the mean over the micro-batches
            total += loss.item() / self.accumulate
        for name, optim in self.optimizers.items():
            _clip_and_step(self.models[name], optim, None)
        if self.ema is not None:  # a short memory while the weights move fast, then the configured decay
            self.ema.update(self.models["teacher"], min(cfg.ema_decay, (1 + step) / (10 + step)))
        return self.mean_losses({"loss": total})

    def outputs(self) -> dict[str, dict[str, Tensor]]:
        dit = self.ema.full_state_dict() if self.ema is not None else full_state_dict(self.models["teacher"])
        return {"teacher": dit, "text": full_state_dict(self.models["text"])}


class ODEStage(Stage):
    """Sample teacher ODE trajectories, then regress the block-causal student onto them (eq. 4)."""

    name = "ode"

    def setup(self) -> None:
        cfg = self.recipe.ode
        self.total_steps = cfg.steps
        self.text = self.frozen_text()
        if self.recipe.student_checkpoint:  # a Self-Forcing student replaces the ODE initialisation
            from train import wan

            self.total_steps = 0
            self.models = {"student": self.sharded(self.trainable(wan.student_init(self.recipe, self.device)))}
            self.optimizers = {}
            return
        teacher = self.frozen_teacher()
        self.trajectories = [self._trajectories(teacher) for _ in self.micro_batches()]
        student = WanModel(self.recipe.model)
        student.load_state_dict(teacher.state_dict())  # the student starts as the teacher, made causal (fp32 master)
        self.models = {"student": self.sharded(self.trainable(student))}
        self.optimizers = {"student": _adamw(self.models["student"].parameters(), cfg.lr)}

    @torch.no_grad()
    def _trajectories(self, teacher: WanModel) -> dict:
        """The current micro-batch's virtual rank's share of the trajectories, cached on disk (deterministic from the
        recipe)."""
        cfg, rank, world = self.recipe.ode, self.vranks[self.micro], self.vworld
        path = self.dir / f"trajectories_rank{rank}_of{world}_{self.recipe.dtype}.pt"
        if path.is_file():
            return torch.load(path, weights_only=False)
        count = math.ceil(cfg.trajectories / world)
        gen = torch.Generator().manual_seed(self.recipe.seed + 31 * rank)
        states, targets, prompts = [], [], []
        batch = max(1, min(32, count))
        for i in range(0, count, batch):
            n = min(batch, count - i)
            p = self.prompts(i, n, 99)
            shape = (n, self.recipe.model.in_channels, self.recipe.horizon, *self.recipe.latent_hw)
            noise = R.randn(shape, gen, self.device)
            ctx, unc = self.encode(self.text, p), self.encode(self.text, [self.recipe.negative_prompt] * n)
            x0, xs = R.teacher_ode(
                teacher, noise, ctx, unc, guidance=cfg.guidance, steps=cfg.euler_steps, shift=self.schedule.shift
            )  # fp32 states and targets (the teacher's flow in its dtype)
            states.append(xs.cpu())
            targets.append(x0.cpu())
            prompts += p
        data = {"states": torch.cat(states), "x0": torch.cat(targets), "prompts": prompts}
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
        return data

    def step(self, step: int) -> dict[str, float]:
        """Eq. 4 with the context inference gives: one chunk per sample at a state of its teacher trajectory, the
        chunks before it clean (sigma 0: their K/V are what the cache's context passes write), and the regression
        on that chunk alone (the chunks after it cannot reach it through the block-causal mask). Regressing every
        chunk with noisy chunks before it instead trains on a context the student never sees, and its videos jump
        at every chunk boundary (chunk seam 2.0 on the toy world)."""
        self.optimizers["student"].zero_grad(set_to_none=True)
        total = 0.0
        for k in self.micro_batches():
            loss = self.regression_loss(*self.regression_batch(self.trajectories[k]))
            (loss / self.accumulate).backward()  # the gradient of the mean over the micro-batches
            total += loss.item() / self.accumulate
        _clip_and_step(self.models["student"], self.optimizers["student"], None)
        return self.mean_losses({"loss": total})

    def regression_batch(self, data: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One micro-batch of eq. 4 from a virtual rank's trajectories: x [B, C, F, h, w], sigma [B, F], the
        context [B, Lt, text_dim], the clean targets and the mask of the chunk each sample learns [B, F]."""
        cfg, rc = self.recipe.ode, self.recipe
        idx = torch.randint(len(data["prompts"]), (cfg.batch_size,), generator=self.generator)
        chunks = math.ceil(rc.horizon / rc.frames_per_chunk)
        target = torch.randint(chunks, (cfg.batch_size, 1), generator=self.generator)  # the chunk each sample learns
        which = torch.randint(4, (cfg.batch_size,), generator=self.generator)  # at this denoising step
        noisy = (torch.arange(rc.horizon) // rc.frames_per_chunk)[None, :] == target  # [B, F]
        clean = data["x0"][idx]  # [B, C, F, h, w]
        x = torch.where(noisy[:, None, :, None, None], data["states"][idx, which], clean).to(self.device)
        sigma = torch.tensor(self.schedule.sigmas)[which][:, None] * noisy  # [B, F]: 0 on the clean context
        sigma, noisy, clean = sigma.to(self.device), noisy.to(self.device), clean.to(self.device)
        ctx = self.encode(self.text, [data["prompts"][i] for i in idx.tolist()])
        return x, sigma, ctx, clean, noisy

    def regression_loss(self, x: Tensor, sigma: Tensor, ctx: Tensor, clean: Tensor, noisy: Tensor) -> Tensor:
        """The mean squared error of the learnt chunks' x0 (every sample has the same number of them)."""
        rc = self.recipe
        flow = self.models["student"](x, 1000 * sigma, ctx, frames_per_chunk=rc.frames_per_chunk, window=rc.window)
        x0 = flow_to_x0(x, flow, sigma[:, None, :, None, None])
        weight = noisy[:, None, :, None, None].expand_as(x0)
        return F.mse_loss(x0[weight], clean[weight])

    def outputs(self) -> dict[str, dict[str, Tensor]]:
        return {"student": full_state_dict(self.models["student"])}


class DMDStage(Stage):
    """Self-Forcing (rollout_frames == horizon) and Self-Forcing++ (rollout_frames >> horizon, a random window)."""

    name = "dmd"

    @property
    def cfg(self) -> DMDConfig:
        return self.recipe.dmd(self.name)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.rollout_frames < self.recipe.horizon:
            raise ValueError(f"rollout_frames ({cfg.rollout_frames}) must be >= the horizon ({self.recipe.horizon})")
        self.total_steps = cfg.steps * cfg.critic_per_gen
        self.text = self.frozen_text()
        self.teacher = self.frozen_teacher()
        self.self_forcing_init = bool(self.recipe.student_checkpoint)
        if self.self_forcing_init:  # Self-Forcing's own student: `dmd` has nothing to train, `extended` starts there
            from train import wan

            generator = wan.student_init(self.recipe, torch.device("cpu"))
            self.total_steps = 0 if self.name == "dmd" else self.total_steps
        else:
            generator = load_module(WanModel(self.recipe.model), self.out / "ode" / "final" / "student.safetensors")
        critic = WanModel(self.recipe.model)
        # the fake score starts as the real one (in fp32 for its master weights: Wan's own, or the toy teacher's)
        critic.load_state_dict(self.teacher_weights())
        self.models = {
            "generator": self.sharded(self.with_lora(self.trainable(generator)), ("forward_chunk", "text_kv")),
            "critic": self.sharded(self.with_lora(self.trainable(critic))),
        }
        betas = (0.0, 0.999)  # as in the paper
        self.optimizers = {
            "generator": _adamw(
                self.trainable_parameters(self.models["generator"]), cfg.gen_lr, betas, cfg.weight_decay
            ),
            "critic": _adamw(self.trainable_parameters(self.models["critic"]), cfg.critic_lr, betas, cfg.weight_decay),
        }
        self.ema = EMA(self.models["generator"], cfg.ema_decay)

    def teacher_weights(self) -> dict[str, Tensor]:
        if self.dtype == torch.float32:
            return self.teacher.state_dict()
        if self.recipe.wan:
            from train import wan

            return wan.teacher(self.recipe, torch.device("cpu")).state_dict()
        path = self.out / "teacher" / "final" / "teacher.safetensors"
        return load_module(WanModel(self.recipe.model), path).state_dict()

    def draw_window(self) -> R.WindowDraw:
        """The window's structure, from the shared generator (the same on every rank).

        start: chunk-aligned, uniform over the N-frame rollout (the paper; eq. 2) or Beta(1, 2) (its ablation).
        noise_step: for backward noise initialisation, uniform over the denoising steps (Algorithm 1 line 4).
        exit steps: the last step (Self-Forcing++) or one uniform step >= noise_step for all chunks (Self-Forcing)."""
        cfg, fpc, steps = self.cfg, self.recipe.frames_per_chunk, len(self.schedule.sigmas)
        starts = (cfg.rollout_frames - self.recipe.horizon) // fpc + 1
        if cfg.window_sampling == "uniform":
            start = fpc * int(torch.randint(starts, (1,), generator=self.shared))
        else:
            u = torch.rand(2, generator=self.shared)  # Beta(1, 2) is the minimum of two uniforms
            start = fpc * min(int(u.min() * starts), starts - 1)
        noise_step = int(torch.randint(steps, (1,), generator=self.shared)) if cfg.noise_init == "backward" else 0
        if cfg.grad_step == "last":
            exit_step = steps - 1
        else:
            exit_step = int(torch.randint(noise_step, steps, (1,), generator=self.shared))
        draw = R.WindowDraw(start, noise_step, (exit_step,) * math.ceil(self.recipe.horizon / fpc))
        self.draws.append((draw.start, draw.noise_step, draw.exit_steps))
        return draw

    def rollout_window(self, prompts: list[str], draw: R.WindowDraw) -> tuple[R.Window, RingKVCache, Tensor]:
        """A window of the student's own rollout (no gradients), its cache and the prompts' context: the context
        frames on the fast path (the rollout copy through the chunk runner), the window through the generator."""
        gen_model = self.models["generator"]
        ctx = self.encode(self.text, prompts)
        cache, runner = self.new_cache(gen_model, len(prompts), ctx, self.rollout_model("generator"))
        shape = self.chunk_shape(len(prompts))
        window = R.window_rollout(gen_model, cache, shape, draw, self.schedule, self.generator, runner=runner)
        return window, cache, ctx

    def step(self, step: int) -> dict[str, float]:
        cfg, K = self.cfg, self.accumulate
        batches = []  # per micro-batch: its prompts, the unconditional context, DMD's noise levels
        for _ in self.micro_batches():
            prompts = self.prompts(step, cfg.batch_size, 5)
            uncond = self.encode(self.text, [self.recipe.negative_prompt] * len(prompts))
            sigma = R.sample_sigma(len(prompts), self.generator, cfg.min_sigma, cfg.max_sigma, self.schedule.shift)
            batches.append((prompts, uncond, sigma))
        losses = {}
        if step % cfg.critic_per_gen == 0:  # generator update
            draw, total = self.draw_window(), 0.0  # one window for every micro-batch, as for every rank
            self.optimizers["generator"].zero_grad(set_to_none=True)
            for k in self.micro_batches():
                prompts, uncond, sigma = batches[k]
                window, cache, ctx = self.rollout_window(prompts, draw)
                x0 = window.x0[:, :, : self.recipe.horizon].clone().requires_grad_()  # DMD's gradient w.r.t. it
                loss = R.dmd_loss(
                    x0, self.teacher, self.models["critic"], ctx, uncond, sigma, self.generator, cfg.guidance
                )
                (loss / K).backward()
                grad_x0 = F.pad(x0.grad, (0, 0, 0, 0, 0, window.x0.shape[2] - x0.shape[2]))  # frames past K: none
                R.window_backward(self.models["generator"], cache, window, grad_x0, self.schedule)
                total += loss.item() / K
            losses["gen_grad_norm"] = _clip_and_step(
                self.models["generator"], self.optimizers["generator"], cfg.max_grad_norm
            )
            self.rollout_model("generator").stale()
            gen_step = step // cfg.critic_per_gen
            self.ema.update(self.models["generator"], 0.0 if gen_step < cfg.ema_start else None)
            losses["dmd"] = total
        draw, total = self.draw_window(), 0.0
        self.optimizers["critic"].zero_grad(set_to_none=True)
        for k in self.micro_batches():
            window, _, ctx = self.rollout_window(batches[k][0], draw)
            x0 = window.x0[:, :, : self.recipe.horizon]
            sigma = R.sample_sigma(x0.shape[0], self.generator, cfg.min_sigma, cfg.max_sigma, self.schedule.shift)
            loss = R.critic_loss(self.models["critic"], x0, ctx, sigma, self.generator)
            (loss / K).backward()
            total += loss.item() / K
        _clip_and_step(self.models["critic"], self.optimizers["critic"], cfg.max_grad_norm)
        losses["critic"] = total
        return self.mean_losses(losses)

    def outputs(self) -> dict[str, dict[str, Tensor]]:
        generator = full_state_dict(self.models["generator"])
        ema = {**generator, **self.ema.full_state_dict()}  # with LoRA the EMA holds the adapters only
        model = self.models["generator"]
        return {"generator": self.plain(generator, model), "ema": self.plain(ema, model)}


class ExtendedDMDStage(DMDStage):
    name = "extended"


class GRPOStage(Stage):
    """Groups of rollouts per prompt, rewarded for smooth optical flow; clipped policy-ratio objective (eq. 5-7)."""

    name = "grpo"

    def setup(self) -> None:
        cfg = self.recipe.grpo
        self.total_steps = cfg.steps
        self.text = self.frozen_text()
        policy = load_module(WanModel(self.recipe.model), self.out / "extended" / "final" / "ema.safetensors")
        self.models = {"policy": self.sharded(self.with_lora(self.trainable(policy)), ("forward_chunk", "text_kv"))}
        self.optimizers = {"policy": _adamw(self.trainable_parameters(self.models["policy"]), cfg.lr)}

    def step(self, step: int) -> dict[str, float]:
        cfg, policy, K = self.recipe.grpo, self.models["policy"], self.accumulate
        rollout = self.rollout_model("policy")
        groups = []  # per micro-batch: its context, recorded rollout, advantages (the replay restarts the ring)
        reward = 0.0
        for _ in self.micro_batches():
            prompts = self.prompts(step, cfg.prompts_per_step, 6)
            prompts = [p for p in prompts for _ in range(cfg.group_size)]  # [P * G]
            ctx = self.encode(self.text, prompts)
            cache, _ = self.new_cache(policy, len(prompts), ctx, rollout)  # one ring for every micro-batch
            # The rollout copy on the torch path (kernels off): its log-probabilities are what the replay recomputes
            # with gradients, so the first epoch's ratios are exactly 1.
            record = R.policy_rollout(
                rollout.get(kernels=False), cache, self.chunk_shape(len(prompts)), cfg.rollout_frames, self.schedule,
                self.generator,
            )  # fmt: skip
            frames = self.codec.decode_frames(torch.cat([c["x0"] for c in record], 2)).cpu().numpy()
            rewards = torch.tensor([smoothness_reward(f, cfg.flow_floor) for f in frames])
            g = rewards.view(-1, cfg.group_size)
            advantages = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten().to(self.device)
            groups.append((ctx, record, advantages))
            reward += float(rewards.mean()) / K
        total = 0.0
        for _ in range(cfg.inner_epochs):
            self.optimizers["policy"].zero_grad(set_to_none=True)
            for ctx, record, advantages in groups:
                cache.reset()
                with torch.no_grad():
                    cache.set_text(policy.text_kv(ctx))
                for c, chunk in enumerate(record):  # backward per chunk, before its context pass: no graph in the ring
                    R._gradient_sync(policy, c == len(record) - 1)
                    # Log-probabilities are sums over ~10^5 dimensions (eq. 7): a log-ratio can reach hundreds after
                    # one update. Beyond e^20 the ratio is held (no gradient) instead of overflowing to inf and NaN.
                    log_ratio = R.replay_logp(policy, cache, chunk, self.schedule) - chunk["logp"]  # [B, T-1]
                    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
                    adv = advantages[:, None]
                    objective = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
                    loss = -objective.mean() / len(record) / K
                    loss.backward()
                    R.replay_context(policy, cache, chunk, self.schedule)
                    total += loss.item()
            _clip_and_step(policy, self.optimizers["policy"], cfg.max_grad_norm)
            rollout.stale()
        return self.mean_losses({"reward": reward, "loss": total / cfg.inner_epochs})

    def outputs(self) -> dict[str, dict[str, Tensor]]:
        return {"policy": self.plain(full_state_dict(self.models["policy"]), self.models["policy"])}


STAGE_CLASSES = {
    "teacher": TeacherStage,
    "ode": ODEStage,
    "dmd": DMDStage,
    "extended": ExtendedDMDStage,
    "grpo": GRPOStage,
}


def run_stage(name: str, recipe: Recipe, out: Path, env: Dist, stop_after: int | None = None) -> list[dict]:
    if name not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {name!r}; choose from {list(STAGE_CLASSES)}")
    if recipe.wan:  # the teacher is Wan2.1 itself: its stage only encodes the prompts, once, for every later stage
        from train import wan

        wan.prepare(recipe, Path(out), env)
        if name == "teacher":
            return []
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    return STAGE_CLASSES[name](recipe, out, env).run(stop_after=stop_after)
