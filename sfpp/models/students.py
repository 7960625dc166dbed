"""Known public Wan2.1 students: what their files hold and the stream settings they were trained with, in one
table. `Pipeline.from_pretrained(wan_dir, student=NAME, checkpoint=..., lora=...)` and `sfpp generate --student NAME`
apply a preset; `sfpp generate --list-students` prints this table. Each preset cites the file its settings come from.

Windows are sfpp's: `window` frames after `sink` frames (a peer's "local attention of 12 with 3 sinks" is window 9,
sink 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from sfpp.engine.sampler import FlowMatchSchedule


@dataclass(frozen=True)
class Student:
    name: str
    about: str
    weights: str  # how to find the files
    ema: bool  # take `generator_ema` (else `generator`) from the checkpoint
    frames_per_chunk: int
    window: int
    sink: int
    denoising_steps: tuple[int, ...]
    shift: float
    context_noise: float
    warp: bool  # denoising steps warped by the shift (else timesteps as given)
    lora_alpha: float | None  # LoRA alpha of its adapter (None: no adapter, or alpha = rank)
    needs_lora: bool
    source: str  # where these settings are written

    @property
    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(
            denoising_steps=self.denoising_steps, shift=self.shift, context_noise=self.context_noise, warp=self.warp
        )

    def command(self) -> str:
        lora = " --lora lora.pt" if self.needs_lora else ""
        checkpoint = self.weights.split()[0]
        return f"sfpp generate --model Wan2.1-T2V-1.3B --student {self.name} --checkpoint {checkpoint}{lora} -p ..."


STUDENTS: dict[str, Student] = {
    "self-forcing": Student(
        name="self-forcing",
        about="Self-Forcing DMD (Huang et al. 2025), 4 steps, chunks of 3 latent frames",
        weights="self_forcing_dmd.pt (gdhe17/Self-Forcing on the Hugging Face Hub: checkpoints/)",
        ema=True,
        frames_per_chunk=3,
        window=21,  # its KV cache holds 21 latent frames (the 81-frame training length); no sink
        sink=0,
        denoising_steps=(1000, 750, 500, 250),
        shift=5.0,
        context_noise=0.0,
        warp=True,
        lora_alpha=None,
        needs_lora=False,
        source="guandeh17/Self-Forcing at 33593df: configs/self_forcing_dmd.yaml (denoising_step_list [1000, 750, 500, "
        "250], warp_denoising_step true, timestep_shift 5.0, num_frame_per_block 3), configs/default_config.yaml "
        "(context_noise 0), pipeline/causal_inference.py (local_attn_size -1: a KV cache of 32760 tokens, 21 frames "
        "of 1560), README.md (inference with --use_ema)",
    ),
    "longlive": Student(
        name="longlive",
        about="LongLive (Yang et al. 2025): a base generator plus a LoRA (rank 256, alpha 256), 3 attention sinks",
        weights="longlive_base.pt and lora.pt (Efficient-Large-Model/LongLive-1.3B on the Hugging Face Hub)",
        ema=False,  # use_ema: false
        frames_per_chunk=6,
        window=9,  # local_attn_size 12 counts the 3 sink frames
        sink=3,
        denoising_steps=(1000, 750, 500, 250),
        shift=5.0,
        context_noise=0.0,
        warp=True,  # warp_denoising_step true
        lora_alpha=256.0,
        needs_lora=True,
        source="NVlabs/LongLive configs/longlive_inference.yaml at 9266de9 (num_frame_per_block 6, local_attn_size "
        "12, sink_size 3, timestep_shift 5.0, use_ema false, context_noise 0, adapter rank 256 alpha 256)",
    ),
    "causvid": Student(
        name="causvid",
        about="CausVid (Yin et al. 2025), autoregressive DMD student, 3 steps, chunks of 3 latent frames",
        weights="autoregressive_checkpoint/model.pt (tianweiy/CausVid on the Hugging Face Hub; a plain `generator` "
        "file: name this preset, it is not detected)",
        ema=False,  # model.pt holds `generator` only
        frames_per_chunk=3,
        window=21,  # a 32760-token KV cache: 21 frames of 1560, no sink
        sink=0,
        denoising_steps=(1000, 757, 522),
        shift=8.0,
        context_noise=0.0,
        warp=False,
        lora_alpha=None,
        needs_lora=False,
        source="tianweiy/CausVid at ca21150: configs/wan_causal_dmd.yaml (denoising_step_list [1000, 757, 522, 0], "
        "warp_denoising_step false, num_frame_per_block 3), causvid/models/wan/wan_wrapper.py (its scheduler's "
        "shift 8.0), causvid/models/wan/causal_inference.py (a 32760-token KV cache, the context at timestep 0), "
        "minimal_inference/autoregressive_inference.py (model.pt's 'generator')",
    ),
}


def get_student(name: str) -> Student:
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; known: {sorted(STUDENTS)} (sfpp generate --list-students)")
    return STUDENTS[name]


def detect_student(checkpoint_entries: set[str], lora: bool) -> Student | None:
    """The preset a checkpoint's own entries point to, or None: a LongLive adapter (`generator_lora`) or a LoRA
    beside a plain `generator`; a Self-Forcing checkpoint (`generator_ema`)."""
    if lora or "generator_lora" in checkpoint_entries:
        return STUDENTS["longlive"]
    if "generator_ema" in checkpoint_entries:
        return STUDENTS["self-forcing"]
    return None


def table() -> str:
    """The presets as `sfpp generate --list-students` prints them."""
    lines = []
    for s in STUDENTS.values():
        lines += [
            f"{s.name}: {s.about}",
            f"  weights: {s.weights}; {'generator_ema' if s.ema else 'generator'} weights",
            f"  chunks of {s.frames_per_chunk} latent frames, window {s.window}, sink {s.sink}, steps "
            f"{list(s.denoising_steps)}{'' if s.warp else ' (timesteps, unwarped)'}, shift {s.shift:g}, context noise "
            f"{s.context_noise:g}"
            + (f", LoRA alpha {s.lora_alpha:g}" if s.lora_alpha is not None else ""),
            f"  source: {s.source}",
            f"  {s.command()}",
        ]
    return "\n".join(lines)
