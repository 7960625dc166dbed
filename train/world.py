"""A procedural video world to train and evaluate on without any data set.

Coloured shapes of two sizes move at two speeds, bounce off the walls and occlude each other over a textured, lit
background that may pan. Every clip is a pure function of its seed, comes with a prompt that describes it and with
its ground truth (colours, sizes, speeds, positions) for evaluation, and renders on a CPU in milliseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

COLOURS = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.85),
    "cyan": (0.15, 0.9, 0.9),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = {
    "grey": (0.35, 0.35, 0.38),
    "purple": (0.3, 0.18, 0.4),
    "brown": (0.4, 0.28, 0.16),
    "teal": (0.1, 0.3, 0.3),
}
SHAPES = ("circle", "square", "diamond")
TEXTURES = ("striped", "checkered", "plain")
SIZES = {"small": 0.1, "big": 0.17}  # radius as a fraction of the frame side
SPEEDS = {"slowly": 0.012, "fast": 0.03}  # frame sides per frame
PANS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
PAN_SPEED = 0.01


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    speed: str
    start: tuple[float, float]  # (x, y) in [0, 1]
    direction: float  # radians

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def positions(self, frames: Tensor) -> Tensor:
        """Centre [T, 2] at each frame index: straight motion folded back at the walls (a bounce)."""
        step = SPEEDS[self.speed] * torch.tensor([math.cos(self.direction), math.sin(self.direction)])
        lo, span = self.radius, 1 - 2 * self.radius
        raw = (torch.tensor(self.start) - lo) / span + frames[:, None].double() * step / span
        folded = torch.remainder(raw, 2.0)
        return (lo + span * torch.where(folded > 1, 2 - folded, folded)).float()


@dataclass(frozen=True)
class WorldSpec:
    objects: tuple[WorldObject, ...]
    background: str
    texture: str
    pan: str | None
    light: float  # direction of the lighting gradient, radians

    def prompt(self) -> str:
        things = [f"a {o.size} {o.colour} {o.shape} moving {o.speed}" for o in self.objects]
        text = " and ".join(things) + f" over a {self.texture} {self.background} background"
        return text + (f", camera panning {self.pan}" if self.pan else "")


def sample_spec(seed: int, max_objects: int = 2) -> WorldSpec:
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63)  # decorrelate seeds

    def pick(options):
        options = list(options)
        return options[int(torch.randint(len(options), (1,), generator=g))]

    count = 1 + int(torch.randint(max_objects, (1,), generator=g))
    colours = torch.randperm(len(COLOURS), generator=g)[:count].tolist()
    objects = []
    for c in colours:
        size = pick(SIZES)
        r = SIZES[size]
        start = (r + (1 - 2 * r) * torch.rand(2, generator=g)).tolist()
        objects.append(
            WorldObject(
                shape=pick(SHAPES),
                colour=list(COLOURS)[c],
                size=size,
                speed=pick(SPEEDS),
                start=(start[0], start[1]),
                direction=float(torch.rand(1, generator=g)) * 2 * math.pi,
            )
        )
    pan = pick([None, None, *PANS])
    return WorldSpec(tuple(objects), pick(BACKGROUNDS), pick(TEXTURES), pan, float(torch.rand(1, generator=g)) * 6.28)


def render(spec: WorldSpec, num_frames: int, size: int = 32, start: int = 0) -> Tensor:
    """Frames [T, 3, size, size] in [-1, 1] for frame indices start .. start + num_frames - 1."""
    frames = torch.arange(start, start + num_frames)
    coords = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
    pan = torch.tensor(PANS[spec.pan]) * PAN_SPEED if spec.pan else torch.zeros(2)
    shift = frames[:, None].float() * pan  # [T, 2]: the camera moves, the texture slides the other way
    u = x[None] + shift[:, 0, None, None]
    v = y[None] + shift[:, 1, None, None]
    if spec.texture == "striped":
        pattern = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * (u + v))
    elif spec.texture == "checkered":
        pattern = ((torch.floor(u * 6) + torch.floor(v * 6)) % 2).float()
    else:
        pattern = torch.full_like(u, 0.5)
    light = 0.75 + 0.5 * (math.cos(spec.light) * (x - 0.5) + math.sin(spec.light) * (y - 0.5))  # [S, S]
    base = torch.tensor(BACKGROUNDS[spec.background])[None, :, None, None]
    image = base * (0.7 + 0.6 * pattern[:, None]) * light[None, None]  # [T, 3, S, S]
    soft = 1.5 / size  # anti-aliased edges, one and a half pixels wide
    for obj in spec.objects:
        centre = obj.positions(frames)  # [T, 2]
        dx = x[None] - centre[:, 0, None, None]
        dy = y[None] - centre[:, 1, None, None]
        if obj.shape == "circle":
            dist = torch.sqrt(dx**2 + dy**2)
        elif obj.shape == "square":
            dist = torch.maximum(dx.abs(), dy.abs()) * 1.15
        else:
            dist = (dx.abs() + dy.abs()) * 0.8
        alpha = torch.sigmoid((obj.radius - dist) / soft * 4)[:, None]  # [T, 1, S, S]
        colour = torch.tensor(COLOURS[obj.colour])[None, :, None, None]
        image = image * (1 - alpha) + colour * light[None, None] ** 0.5 * alpha
    return (image.clamp(0, 1) * 2 - 1).contiguous()


def frames_uint8(video: Tensor) -> Tensor:
    """Rendered frames [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3], the pipeline's frame format."""
    return ((video.movedim(-3, -1) + 1) * 127.5).round().byte()


def eval_specs(seed: int, num_prompts: int) -> list[WorldSpec]:
    """The evaluation prompts of one evaluation seed (`train.evaluate`; seed 0's are also `train.endless`'s and
    `train.steering`'s)."""
    return [sample_spec(7_000_000 + 1000 * seed + i) for i in range(num_prompts)]


def render_batch(seeds: list[int], num_frames: int, size: int = 32, start: int = 0) -> tuple[Tensor, list[str]]:
    """Videos [B, T, 3, S, S] and their prompts."""
    specs = [sample_spec(s) for s in seeds]
    return torch.stack([render(s, num_frames, size, start) for s in specs]), [s.prompt() for s in specs]


_OBJECT = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(SPEEDS)})")
_PROMPT = re.compile(
    rf"(?P<objects>{_OBJECT.pattern}(?: and {_OBJECT.pattern})*) over a (?P<texture>{'|'.join(TEXTURES)}) "
    rf"(?P<background>{'|'.join(BACKGROUNDS)}) background(?:, camera panning (?P<pan>{'|'.join(PANS)}))?"
)


def parse_prompt(prompt: str) -> WorldSpec:
    """The world a prompt in the world's own grammar (`WorldSpec.prompt`) describes, for measuring fidelity to it.
    Where objects start and head is not in a prompt: every object starts at the centre heading right."""
    match = _PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a prompt of the toy world's grammar (see train/world.py): {prompt!r}")
    objects = tuple(
        WorldObject(shape=shape, colour=colour, size=size, speed=speed, start=(0.5, 0.5), direction=0.0)
        for size, colour, shape, speed in _OBJECT.findall(match["objects"])
    )
    return WorldSpec(objects, match["background"], match["texture"], match["pan"], light=0.0)
