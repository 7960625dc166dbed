"""TAEHV, the tiny streaming decoder for Wan2.1 latents (the pipeline's `decoder="tiny"`).

TAEHV ("Tiny AutoEncoder for Hunyuan Video", github.com/madebyollin/taehv) with its `taew2_1` weights decodes the
normalised 16-channel latents the Wan2.1 DiT produces (no mean/std to undo) to RGB at 8x the resolution and 4x the
frames, with ~10 M parameters of 2D convolutions instead of the Wan VAE's 3D ones: a preview-quality decoder that
keeps up with a real-time stream.

The decoder is a flat sequence (indices are the parameter names of `taew2_1.pth`, `decoder.<i>.*`):

    0 soft clamp 3 tanh(z / 3)   1 conv 16->256   2 ReLU
    3-5 memory blocks (256)      6 2x upsample    7 temporal grow x1    8 conv 256->128
    9-11 memory blocks (128)     12 2x upsample   13 temporal grow x2   14 conv 128->64
    15-17 memory blocks (64)     18 2x upsample   19 temporal grow x2   20 conv 64->64
    21 ReLU                      22 conv 64->3, then clamp to [0, 1]

Convolutions are 3x3 per frame. Time enters in two places only: a memory block sees each frame's input beside the
previous frame's input (zeros before the first frame), and a temporal grow maps each frame to `stride` frames with a
1x1 convolution to `stride` x channels. So F latent frames give 4F frames; the first 3 come from the zero start-up
state and are dropped (as TAEHV's own `decode_video` and flashdreams do), leaving 1 + 4(F-1) frames: the Wan VAE's
count, and the count the pipeline plans with (`temporal_factor` 4, `sfpp.video.num_latent_frames`). In a stream
the first chunk of f latent frames gives 4f - 3 frames, every later one 4f.

Streaming carries one frame per memory block (its last input) between chunks; inside a chunk every layer runs on all
its frames at once. Decoding in any chunks therefore equals decoding the whole video at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfpp.models.checkpoint import load_file, load_weights

# Each memory block's last input frame [B, 1, C, H, W] of the chunk before, keyed by the block.
MemoryState = dict[nn.Module, Tensor]


def _conv3x3(in_dim: int, out_dim: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Bounds the latents to (-3, 3) smoothly: 3 tanh(x / 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return 3 * torch.tanh(x / 3)


class MemoryBlock(nn.Module):
    """Residual block over a frame and the previous frame's input: relu(convs([x, past]) + x)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * dim, dim), nn.ReLU(), _conv3x3(dim, dim), nn.ReLU(), _conv3x3(dim, dim)
        )  # parameter names conv.0, conv.2, conv.4 as in taew2_1

    def forward(self, x: Tensor, state: MemoryState, batch: int) -> Tensor:  # x: [B*t, C, H, W]
        frames = x.unflatten(0, (batch, -1))  # [B, t, C, H, W]
        prev = state.get(self)
        if prev is None:  # the first frame of a video has an empty memory
            prev = torch.zeros_like(frames[:, :1])
        past = torch.cat([prev, frames[:, :-1]], dim=1).flatten(0, 1)
        state[self] = frames[:, -1:].clone()  # a copy: holding a view would keep the whole chunk alive
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TemporalGrow(nn.Module):
    """Each frame becomes `stride` frames: a 1x1 conv to stride x C channels, split in order along time."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [B*t, C, H, W] -> [B*t*stride, C, H, W]
        return self.conv(x).reshape(-1, *x.shape[1:])


class TAEHVDecoder(nn.Module):
    """TAEHV's decoder for Wan2.1 latents, a pipeline decoder part ("taehv"): `stream()` decodes chunk by chunk."""

    WEIGHTS = "taew2_1.safetensors"  # what `save` writes; `weights_in` also finds the distributed taew2_1.pth
    WEIGHT_FILES = ("taew2_1.safetensors", "taew2_1.pth")
    # The latent space it decodes: Wan2.1's (class attributes, so a pipeline can check them before loading weights).
    channels = 16
    spatial_factor = 8
    temporal_factor = 4
    DIMS = (256, 128, 64, 64)  # stage widths
    TIME_STRIDES = (1, 2, 2)  # temporal grow per stage: 4x in all

    def __init__(self) -> None:
        super().__init__()
        d = self.DIMS
        layers: list[nn.Module] = [SoftClamp(), _conv3x3(self.channels, d[0]), nn.ReLU()]
        for i, stride in enumerate(self.TIME_STRIDES):
            layers += [MemoryBlock(d[i]), MemoryBlock(d[i]), MemoryBlock(d[i])]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), TemporalGrow(d[i], stride)]
            layers.append(_conv3x3(d[i], d[i + 1], bias=False))
        layers += [nn.ReLU(), _conv3x3(d[-1], 3)]
        self.decoder = nn.Sequential(*layers)
        # Raw output frames before the first kept one: a latent frame grows into 4, the first latent frame's
        # first 3 of them are start-up frames.
        self.trim_frames = self.temporal_factor - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    # --- weights

    @classmethod
    def from_file(cls, path: str | Path) -> TAEHVDecoder:
        """Load `taew2_1.pth` or `taew2_1.safetensors` as distributed (its encoder's weights are skipped), or the
        file `save` wrote. Weights are read onto a meta-device model (no second copy) and kept in fp32."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tiny decoder weights not found: {path} (TAEHV's taew2_1.pth or .safetensors)")
        state_dict = {k: v for k, v in load_file(path).items() if not k.startswith("encoder.")}
        with torch.device("meta"):
            decoder = cls()
        load_weights(decoder, state_dict, source=str(path))
        return decoder.float().eval()

    @classmethod
    def weights_in(cls, directory: str | Path) -> Path:
        """The TAEHV weights file in a model directory, or a FileNotFoundError that says where to put one."""
        for name in cls.WEIGHT_FILES:
            if (Path(directory) / name).is_file():
                return Path(directory) / name
        raise FileNotFoundError(
            f"the tiny decoder needs TAEHV's Wan2.1 weights: put {' or '.join(cls.WEIGHT_FILES)} in {directory}, "
            f"or give its path (decoder_path=, --decoder-weights)"
        )

    def to_meta(self) -> dict:
        return {"type": "taehv", "file": self.WEIGHTS}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        sd = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(Path(directory) / self.WEIGHTS))

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> TAEHVDecoder:
        return cls.from_file(Path(directory) / meta.get("file", cls.WEIGHTS))

    # --- decoding

    def stream(self) -> TAEHVStream:
        return TAEHVStream(self)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, 16, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1], fp32."""
        return self.stream().decode_pixels(z)

    def forward(self, z: Tensor, state: MemoryState) -> Tensor:
        """Latents [B, 16, f, h, w] -> all 4f raw frames [B, 4f, 3, 8h, 8w] (unclamped), updating `state`."""
        batch = z.shape[0]
        x = z.transpose(1, 2).flatten(0, 1).to(self.dtype)  # [B*f, 16, h, w]: frames batched for the 2D convs
        for layer in self.decoder:
            x = layer(x, state, batch) if isinstance(layer, MemoryBlock) else layer(x)
        return x.unflatten(0, (batch, -1))


class TAEHVStream:
    """Decodes one video's latents chunk by chunk, carrying each memory block's last frame in between."""

    def __init__(self, decoder: TAEHVDecoder) -> None:
        self.decoder = decoder
        self.state: MemoryState = {}
        self.first = True

    @torch.no_grad()
    def _next_frames(self, z: Tensor) -> Tensor:
        """Next latents [B, 16, f, h, w] -> their kept frames [B, n, 3, 8h, 8w] in [0, 1], fp32."""
        if z.ndim != 5 or z.shape[1] != self.decoder.channels or z.shape[2] < 1:
            raise ValueError(
                f"latents must be [batch, {self.decoder.channels}, frames >= 1, h, w], got {tuple(z.shape)}"
            )
        x = self.decoder(z, self.state)
        if self.first:
            x = x[:, self.decoder.trim_frames :]
            self.first = False
        return x.float().clamp_(0, 1)

    def decode_pixels(self, z: Tensor) -> Tensor:
        """Next latents [B, 16, f, h, w] -> their frames [B, 3, n, 8h, 8w] in [-1, 1], fp32: n = 1 + 4(f - 1) for
        the first chunk of a video and 4f after it."""
        return self._next_frames(z).mul_(2).sub_(1).transpose(1, 2)

    def decode(self, z: Tensor) -> Tensor:
        """Next latents -> uint8 frames [B, n, H, W, 3], the pipeline's format."""
        return self._next_frames(z).mul_(255).round_().to(torch.uint8).permute(0, 1, 3, 4, 2)
