"""Training recipes as dataclasses: one per stage, bundled in a `Recipe`.

`toy` trains every stage on the procedural world on a 2-core CPU; `smoke` is the same at a size CI runs in seconds;
`wan2.1-1.3b` is the real-model recipe (its data come from the same world interface until real videos are wired in).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sfpp.engine.sampler import FlowMatchSchedule
from sfpp.models.dit import WanConfig, get_config
from sfpp.models.text import ByteTextEncoderConfig


@dataclass(frozen=True)
class TeacherConfig:
    steps: int = 2500
    batch_size: int = 16
    lr: float = 1e-3  # measured on the toy world: 3x faster to the same loss than 3e-4, and stable
    warmup: int = 100
    ema_decay: float = 0.998  # the teacher ships its EMA weights (0 = the last weights): +20% fidelity at 1000 steps
    cond_dropout: float = 0.1  # empty prompt this often, for classifier-free guidance
    train_shift: float = 1.0  # sigma = shift * u / (1 + (shift - 1) u), u ~ U(0, 1): uniform noise levels


@dataclass(frozen=True)
class ODEConfig:
    trajectories: int = 512
    euler_steps: int = 32  # a multiple of the student's 4 steps, so its timesteps lie on the Euler grid
    guidance: float = 3.0  # teacher CFG of the trajectories (the paper does not state it; DMD's scale)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4


@dataclass(frozen=True)
class DMDConfig:
    steps: int = 300  # generator updates
    batch_size: int = 8
    gen_lr: float = 2e-5
    critic_lr: float = 4e-5
    critic_per_gen: int = 5  # critic updates per generator update
    # CFG scale of the real score: Self-Forcing's guidance_scale 3.0, which the paper keeps. One difference: the
    # unconditional branch here is the empty prompt (what the teacher's prompt dropout trained), where Self-Forcing
    # feeds Wan's default negative prompt.
    guidance: float = 3.0
    ema_decay: float = 0.99
    ema_start: int = 50
    rollout_frames: int = 12  # N latent frames rolled out; == the teacher horizon for Self-Forcing
    window_sampling: str = "uniform"  # "uniform" (the paper's) or "beta" (Beta(1, 2) ablation)
    # Which denoising step's x0 carries gradients: "uniform" draws one per rollout, shared by its chunks
    # (Self-Forcing), "last" always the final step (Self-Forcing++'s main method, section 4.3.2 / Table 4).
    grad_step: str = "uniform"
    # How the window starts: "fresh" noise (Self-Forcing), or "backward" noise initialisation (Self-Forcing++,
    # section 3.2 eq. 1 and Algorithm 1 line 4-5: the rollout's clean window re-noised to a denoising step drawn
    # uniformly from the schedule, then denoised again; step 0 has sigma 1, i.e. pure noise).
    noise_init: str = "fresh"
    min_sigma: float = 0.02
    max_sigma: float = 0.98
    weight_decay: float = 0.01  # AdamW, generator and critic: Self-Forcing's default (the paper adopts its settings)
    max_grad_norm: float = 10.0  # gradient clipping, generator and critic (Self-Forcing's)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("window_sampling", self.window_sampling, ("uniform", "beta")),
            ("grad_step", self.grad_step, ("uniform", "last")),
            ("noise_init", self.noise_init, ("fresh", "backward")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def extended_dmd(**overrides) -> DMDConfig:
    """Self-Forcing++'s defaults: long rollouts, gradient at the last step, backward noise initialisation."""
    return DMDConfig(**{"rollout_frames": 60, "grad_step": "last", "noise_init": "backward", **overrides})


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 30
    prompts_per_step: int = 2
    group_size: int = 4
    rollout_frames: int = 24
    lr: float = 1e-5
    clip_eps: float = 0.2
    inner_epochs: int = 2
    flow_floor: float = 0.25  # px/frame added to the mean flow in the reward's denominator
    max_grad_norm: float = 10.0


DMD_FIELDS = {"dmd": "self_forcing", "extended": "extended"}  # DMD stage -> its Recipe field


@dataclass(frozen=True)
class Recipe:
    name: str
    model: WanConfig
    text: ByteTextEncoderConfig
    frame_size: int = 32  # pixels
    codec_factor: int = 4  # pixel block side of the toy codec: latent side = frame_size / codec_factor
    codec_whitening: float = 1.0  # toy codec: 1 whitens its channels, 0 keeps pixel proportions (PatchPCACodec.fit)
    fps: int = 8
    horizon: int = 12  # teacher horizon K in latent frames (= video frames for the toy codec)
    frames_per_chunk: int = 3
    window: int = 12  # student's rolling KV cache in training, latent frames
    sink: int = 0  # first frames the training cache keeps as attention sinks
    # (window, sink) of the cache the trained students run with, shipped and evaluated; None: the training cache.
    # Sinks need no training (StreamingLLM; Rolling Sink): see TOY.
    inference_cache: tuple[int, int] | None = None
    seed: int = 0
    # Noise-level shift of the student's 4 steps and of the teacher's ODE grid (sampler.FlowMatchSchedule): Wan's 5.0
    # suits its large latents; the toy world's 8x8 latents keep detail to resolve at lower noise.
    shift: float = 5.0
    # The student's re-noising shared by the frames from step `correlated_from` on (sampler.FlowMatchSchedule), in the
    # DMD rollouts, GRPO and the shipped pipeline alike. 0: independent per-frame noise (Wan, Self-Forcing).
    frame_correlation: float = FlowMatchSchedule.frame_correlation
    correlated_from: int = FlowMatchSchedule.correlated_from
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    self_forcing: DMDConfig = field(default_factory=DMDConfig)
    extended: DMDConfig = field(default_factory=extended_dmd)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    log_every: int = 25
    ckpt_every: int = 100
    # Activation checkpointing of every k-th DiT block in every forward with gradients (0: none, 1: every block).
    checkpoint_blocks: int = 1
    # "float32" (exactness tests, the toy) or "bfloat16": FSDP2's mixed precision, bf16 compute over fp32 master
    # weights, gradients reduced in fp32, the frozen real score and the KV ring in bf16 (train.common.shard).
    dtype: str = "float32"
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation; see Stage.vranks)
    lora_rank: int = 0  # > 0: peft LoRA of this rank on the generator, critic and GRPO policy (train/lora.py)
    lora_alpha: float | None = None  # LoRA scale alpha / rank; None: alpha = rank
    frame_width: int | None = None  # pixels; None: square frames of frame_size
    # The real model (`train/wan.py`): teacher = the Wan2.1 DiT in wan_dir (Wan's or diffusers' layout), prompts
    # from prompt_file encoded once by its umT5, student by ODE init or from a Self-Forcing student_checkpoint.
    wan: bool = False
    wan_dir: str | None = None
    prompt_file: str | None = None
    student_checkpoint: str | None = None
    negative_prompt: str = ""  # the unconditional prompt of CFG (Self-Forcing uses Wan's default negative prompt)

    def dmd(self, stage: str) -> DMDConfig:
        """The config of a DMD stage: `dmd` (Self-Forcing) or `extended` (Self-Forcing++)."""
        return getattr(self, DMD_FIELDS[stage])

    @property
    def schedule(self) -> FlowMatchSchedule:
        """The student's 4 steps, as training rolls it out and the shipped pipeline samples."""
        return FlowMatchSchedule(
            shift=self.shift, frame_correlation=self.frame_correlation, correlated_from=self.correlated_from
        )

    @property
    def inference_layout(self) -> tuple[int, int]:
        """(window, sink) frames of the cache the trained students run with."""
        return self.inference_cache or (self.window, self.sink)

    @property
    def latent_size(self) -> int:
        return self.frame_size // self.codec_factor

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.frame_size // self.codec_factor, (self.frame_width or self.frame_size) // self.codec_factor


TOY_MODEL = WanConfig(
    dim=128,
    ffn_dim=384,
    num_heads=4,
    num_layers=4,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    text_len=32,
    freq_dim=64,
)
TOY_TEXT = ByteTextEncoderConfig(text_dim=64, text_len=32, num_layers=2, num_heads=2, tokenizer="words")

# The shipped toy models. Shift 3: the first teacher's 32-step samples scored 0.264 fidelity at shift 3 against
# 0.228 at shift 1. A teacher horizon K of 6 latent frames against the students' 12-frame window: Self-Forcing never
# sees a full window, Self-Forcing++'s long rollouts do (issue 20's failure past K; 12-frame clips only cost time).
# The teacher trains 12000 steps: its samples' flicker and fidelity plateau from ~5000
# (train/results/toy/teacher_study.md). CFG 2 for the ODE trajectories and the real score: CFG 3 samples changed
# ~20% more per frame and clipped more. 200 generator updates per DMD stage; no activation checkpointing (it
# changes no number, only memory).
TOY = Recipe(
    "toy",
    TOY_MODEL,
    TOY_TEXT,
    shift=3.0,
    horizon=6,
    window=12,
    teacher=TeacherConfig(steps=12000),
    ode=ODEConfig(guidance=2.0),
    self_forcing=DMDConfig(steps=200, guidance=2.0, rollout_frames=6),
    extended=extended_dmd(steps=200, guidance=2.0),
    checkpoint_blocks=0,
    ckpt_every=500,
    # The students run with 3 attention sinks beside a 9-frame window (the 12 frames they attend in training), added
    # after training: at 20x and 60x the horizon Self-Forcing++'s objects keep 0.94 and 0.82 of the world's speed
    # against 0.65 and 0.75 without, and its exposure and palette hold better (train/results/toy/sinks/).
    inference_cache=(9, 3),
)

RECIPES: dict[str, Recipe] = {
    "toy": TOY,
    # The toy recipe's candidate successor: the codec keeps the pixels' proportions (block means settle first, at high
    # noise) and the teacher trains 6000 steps. Its teacher (train/checkpoints/toy-unwhitened) changes pixels 1.76x
    # the world's at CFG 2 against the toy teacher's 2.01x, fidelity 0.37 against 0.33; its students flicker 9% less
    # with seams 1.23 against 1.32, and are not shipped (teacher_study.md).
    "toy-unwhitened": replace(
        TOY, name="toy-unwhitened", codec_whitening=0.0, teacher=TeacherConfig(steps=6000), inference_cache=None
    ),
    # The toy recipe's students re-noised at their last step (sigma 0.5) with noise 0.9 shared by the frames. Trained
    # so, they flicker a third less, but their objects slow past the horizon and the seams rise; not shipped
    # (train/results/toy/frame_correlation/).
    "toy-correlated": replace(
        TOY, name="toy-correlated", frame_correlation=0.9, correlated_from=3, inference_cache=None
    ),
    # The toy recipe's students trained through the cache the shipped ones run with (3 attention sinks beside a
    # 9-frame window). Self-Forcing++ trained so measures no better than with the sinks added after training
    # (train/results/toy/sinks/). Not shipped.
    "toy-sink": replace(TOY, name="toy-sink", window=9, sink=3),
    "smoke": Recipe(
        "smoke",
        replace(TOY_MODEL, dim=32, ffn_dim=64, num_heads=2, num_layers=1),
        replace(TOY_TEXT, num_layers=1),
        horizon=6,
        window=6,
        teacher=TeacherConfig(steps=4, batch_size=2, warmup=1),
        ode=ODEConfig(trajectories=4, euler_steps=8, steps=3, batch_size=2),
        self_forcing=DMDConfig(steps=2, batch_size=2, critic_per_gen=2, ema_start=0, rollout_frames=6),
        extended=extended_dmd(steps=2, batch_size=2, critic_per_gen=2, ema_start=0, rollout_frames=12),
        grpo=GRPOConfig(steps=2, prompts_per_step=1, group_size=2, rollout_frames=6, inner_epochs=1),
        log_every=1,
        ckpt_every=2,
    ),
    # The real model: Wan2.1-T2V-1.3B at 832x480 (VAE latents 60x104), 21-frame horizon and window, umT5 text;
    # needs wan_dir and prompt_file (python -m train all --recipe wan2.1-1.3b --wan-dir DIR --prompts FILE).
    "wan2.1-1.3b": Recipe(
        "wan2.1-1.3b",
        get_config("wan2.1-1.3b"),
        ByteTextEncoderConfig(text_dim=4096, text_len=512),  # unused: umT5 encodes the prompts
        frame_size=480,
        frame_width=832,
        wan=True,
        codec_factor=8,
        fps=16,
        horizon=21,
        window=21,
        teacher=TeacherConfig(batch_size=1, lr=1e-5),
        ode=ODEConfig(trajectories=16000, batch_size=1),
        self_forcing=DMDConfig(batch_size=1, gen_lr=2e-6, critic_lr=4e-7, rollout_frames=21, ema_start=200),
        extended=extended_dmd(batch_size=1, gen_lr=2e-6, critic_lr=4e-7, rollout_frames=400, ema_start=200),
        grpo=GRPOConfig(rollout_frames=84),
        dtype="bfloat16",
    ),
}


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = replace(RECIPES[name], **overrides)
    if recipe.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {recipe.dtype!r}")
    if recipe.accumulate < 1 or recipe.lora_rank < 0 or recipe.checkpoint_blocks < 0:
        raise ValueError(
            f"accumulate must be >= 1, lora_rank and checkpoint_blocks >= 0; got {recipe.accumulate}, "
            f"{recipe.lora_rank}, {recipe.checkpoint_blocks}"
        )
    return recipe
