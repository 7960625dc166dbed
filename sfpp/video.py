"""Latents to pixels, and pixels to an mp4.

Decoders follow Wan's VAE geometry: 8x spatial and 4x temporal compression, the first latent frame decoding to one
video frame and every later one to four. They decode in a stream, one chunk of latent frames at a time.
`LatentPreviewDecoder` is a fixed linear latent-to-RGB map (no weights to train or download): it shows what the
latents do, it is not a VAE.
"""

from __future__ import annotations

import numbers
import os
import secrets
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def num_latent_frames(num_frames: int, temporal_factor: int) -> int:
    """Latent frames needed for `num_frames` video frames: 1 + ceil((num_frames - 1) / temporal_factor)."""
    return 1 + (num_frames - 1 + temporal_factor - 1) // temporal_factor


class LatentPreviewDecoder:
    temporal_factor = 4
    spatial_factor = 8

    def __init__(self, channels: int = 16) -> None:
        self.channels = channels
        # Each RGB channel averages its own third of the latent channels.
        proj = torch.zeros(3, channels)
        for c in range(channels):
            proj[c * 3 // channels, c] = 1.0
        self.proj = proj / proj.sum(1, keepdim=True)

    def to_meta(self) -> dict:
        return {"type": "preview", "channels": self.channels}

    def save(self, directory: Path) -> None:
        pass  # nothing learned, nothing to save

    @classmethod
    def from_meta(cls, meta: dict, directory: Path) -> LatentPreviewDecoder:
        return cls(meta.get("channels", 16))

    def stream(self) -> _PreviewStream:
        return _PreviewStream(self)

    def decode_frames(self, z: Tensor) -> Tensor:
        """z [B, C, f, h, w] -> uint8 [B, f, 8h, 8w, 3], one image per latent frame."""
        rgb = torch.einsum("rc,bcfhw->bfrhw", self.proj.to(z.device), z.float())
        rgb = F.interpolate(rgb.flatten(0, 1), scale_factor=self.spatial_factor, mode="nearest")
        rgb = rgb.unflatten(0, (z.shape[0], z.shape[2]))
        pixels = (0.5 + 0.5 * torch.tanh(rgb)).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 1, 3, 4, 2)


class _PreviewStream:
    def __init__(self, decoder: LatentPreviewDecoder) -> None:
        self.decoder = decoder
        self.first = True

    def decode(self, z: Tensor) -> Tensor:
        """Next chunk of latents [B, C, f, h, w] -> its video frames uint8 [B, n, H, W, 3]."""
        frames = self.decoder.decode_frames(z).repeat_interleave(self.decoder.temporal_factor, dim=1)
        if self.first:  # the first latent frame stands for one video frame, not four
            frames = frames[:, self.decoder.temporal_factor - 1 :]
            self.first = False
        return frames


VIDEO_SUFFIX = ".mp4"


def check_output_path(path: str | Path) -> Path:
    """The path an mp4 can be written to, checked before any work is done: it ends in .mp4, is not a folder, and
    its folder exists or can be created, and takes new files. A one-line ValueError names the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder: name an {VIDEO_SUFFIX} file in it")
    if path.suffix.lower() != VIDEO_SUFFIX:
        what = f"ends in {path.suffix!r}" if path.suffix else "has no extension"
        raise ValueError(f"output path {str(path)!r} {what}: sfpp writes H.264 {VIDEO_SUFFIX} files")
    folder = path.absolute().parent
    while not folder.exists():  # the nearest existing folder decides: export_to_video creates the rest
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: {folder} is a file, not a folder")
    try:  # the only reliable test of writability (permissions, read-only mounts, root): make a file there
        probe = folder / f".sfpp-probe-{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {folder} does not take new files ({exc.strerror})") from exc
    return path


def _frame_rate(fps) -> Fraction:
    """fps as the exact rational the container stores: 16, 7.5 (= 15/2), 30000/1001 (NTSC) all exact."""
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool):
        raise TypeError(f"fps must be a number, got {fps!r} ({type(fps).__name__})")
    if not 0 < fps < float("inf"):
        raise ValueError(f"fps must be positive and finite, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def export_to_video(frames: Tensor | np.ndarray | list, path: str | Path, fps: float = 16) -> Path:
    """Write one video, frames [T, H, W, 3] (uint8, or float in [0, 1]), to an H.264 mp4 through PyAV. `fps` may be
    fractional (7.5, 29.97). The file appears whole or not at all: it is written beside `path` under a temporary
    name and renamed when complete, so an interrupted export leaves an existing file at `path` as it was."""
    import av

    path = check_output_path(path)
    rate = _frame_rate(fps)
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    if isinstance(frames, Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.ndim == 5:
        raise ValueError(f"export_to_video writes one video; got a batch of {frames.shape[0]}: pass frames[i]")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 1, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {height}x{width}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")  # same folder: the rename is atomic
    try:
        with av.open(str(partial), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "18"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] of a video or an image file (what FFmpeg reads, through PyAV): the input of
    `Pipeline.stream(..., video=...)`."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video or image file: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise ValueError(f"cannot read frames from {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} holds no frames")
    return np.stack(frames)
