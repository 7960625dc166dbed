"""Long-video metrics on decoded frames (uint8 [T, H, W, 3]): exposure, motion, flicker, repetition, colour drift,
the prompted objects as the world draws them (present as one blob of their size, how many blobs, how fast), and
fidelity to the world's ground truth; and the optical-flow smoothness reward of GRPO.

Flicker is `pixel_change`, the mean change of a pixel channel from one frame to the next: a video that boils shows
it however little its objects move, which optical flow (`dynamic`) does not see. Compared with the world's on the
same prompts, it says how much of a video's change is not the world's motion."""

from __future__ import annotations

import math

import numpy as np

from train.world import COLOURS, SPEEDS, WorldSpec

FLOW_UPSCALE = 2  # Farneback needs a few pixels of texture; the toy frames are 32x32


def luma(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, H, W] in [0, 1] (Rec. 601)."""
    return (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
    """Mean optical-flow magnitude between consecutive frames, in pixels of the input per frame. [T] -> [T-1]."""
    import cv2

    gray = [cv2.resize((g * 255).astype(np.uint8), None, fx=FLOW_UPSCALE, fy=FLOW_UPSCALE) for g in luma(frames)]
    mags = []
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 9, 3, 5, 1.1, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()) / FLOW_UPSCALE)
    return np.array(mags, np.float32)


def smoothness_reward(frames: np.ndarray, flow_floor: float) -> float:
    """GRPO reward: minus the mean jump of the flow magnitude between consecutive frame pairs, relative to the mean
    magnitude (plus a floor, so that a frozen video does not win by dividing by nothing). Spikes cost the most."""
    mags = flow_magnitudes(frames)
    if len(mags) < 2:
        return 0.0
    return -float(np.abs(np.diff(mags)).mean() / (mags.mean() + flow_floor))


def window_metrics(
    frames: np.ndarray, spec: WorldSpec | None = None, frames_per_chunk: int | None = None
) -> dict[str, float]:
    """Metrics of one window of frames [T, H, W, 3]: `clipped` is the fraction of pixel channels at exactly 0 or
    255; `pixel_change` the flicker measure (see the module docstring); with the world's `spec`, `fidelity` and
    `object_stats`; `seam` (with `frames_per_chunk`) is `chunk_seam` of the window."""
    y = luma(frames)
    mags = flow_magnitudes(frames)
    out = {
        "luminance": float(y.mean()),
        "clipped": float(((frames == 0) | (frames == 255)).mean()),
        "dynamic": float(mags.mean()) if len(mags) else 0.0,
        "pixel_change": pixel_change(frames),
    }
    if spec is not None:
        out["fidelity"] = fidelity(frames, spec)
        out.update(object_stats(frames, spec))
    if frames_per_chunk is not None:
        out["seam"] = chunk_seam(frames, frames_per_chunk)
    return out


def pixel_change(frames: np.ndarray) -> float:
    """Mean |frame t+1 - frame t| over pixel channels, in [0, 1] (0 for a single frame)."""
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.float32), axis=0)).mean() / 255.0)


def colour_histogram(frames: np.ndarray, bins: int = 8) -> np.ndarray:
    """The joint RGB histogram of frames [T, H, W, 3] uint8, `bins` per channel, normalised to sum 1."""
    q = (frames.astype(np.int64) * bins) // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    counts = np.bincount(codes.ravel(), minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def colour_drift(frames: np.ndarray, reference: np.ndarray) -> float:
    """Total-variation distance (0..1) between the colour histograms of `frames` and of `reference` (e.g. the
    rollout's first window): 0 when the palette holds, towards 1 as it drifts away."""
    return float(0.5 * np.abs(colour_histogram(frames) - colour_histogram(reference)).sum())


def object_masks(frames: np.ndarray, colour: str, tolerance: float = 0.22) -> np.ndarray:
    """[T, H, W] bool: pixels near the named colour under the world's lighting, which scales a colour by about
    0.65..1.1."""
    x = frames.astype(np.float32) / 255.0
    c = np.array(COLOURS[colour], np.float32)
    a = np.clip((x @ c) / (c @ c), 0.65, 1.1)
    return np.linalg.norm(x - a[..., None] * c, axis=-1) < tolerance


def object_stats(frames: np.ndarray, spec: WorldSpec, min_blob: float = 0.2, size_range=(0.5, 2.0)) -> dict:
    """How the prompted objects are drawn, averaged over the objects: `presence`, the fraction of frames where the
    object is exactly one blob (8-connected pixels of its colour; specks under `min_blob` of its area are not blobs)
    of about its size (`size_range` of its true area); `blobs`, blobs per frame (1 for the world; a split object
    shows as 2 or 3, a lost one as 0); `object_speed`, the blob's centroid displacement per frame, over consecutive
    frames where it is present, in frame sides per frame (the world's: `SPEEDS`; NaN when never present twice)."""
    import cv2

    side = frames.shape[1]
    presence, blobs, speeds = [], [], []
    for obj in spec.objects:
        area = _area(obj.shape, obj.radius) * side * side
        counts, centres, present = [], [], []
        for mask in object_masks(frames, obj.colour):
            n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_blob * area]
            counts.append(len(big))
            one = len(big) == 1 and size_range[0] * area <= stats[big[0], cv2.CC_STAT_AREA] <= size_range[1] * area
            present.append(one)
            centres.append(cents[big[0]] if one else (np.nan, np.nan))
        present, centres = np.array(present), np.array(centres, np.float64)
        presence.append(float(present.mean()))
        blobs.append(float(np.mean(counts)))
        both = present[1:] & present[:-1]
        moved = np.linalg.norm(np.diff(centres, axis=0), axis=-1)[both] / side
        speeds.append(float(moved.mean()) if both.any() else np.nan)
    finite = [v for v in speeds if np.isfinite(v)]
    return {
        "presence": float(np.mean(presence)),
        "blobs": float(np.mean(blobs)),
        "object_speed": float(np.mean(finite)) if finite else float("nan"),
    }


def chunk_seam(frames: np.ndarray, frames_per_chunk: int) -> float:
    """Mean frame-to-frame change across chunk boundaries over the mean change inside chunks (frames [T, H, W, 3],
    the first frame starting a chunk). 1 means the seams are invisible; a jump every chunk shows as > 1."""
    change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # [T-1]: frame t -> t + 1
    across = (np.arange(1, len(frames)) % frames_per_chunk) == 0
    if not across.any() or across.all():
        return float("nan")
    return float(change[across].mean() / max(change[~across].mean(), 1e-6))


def no_repeat(frames: np.ndarray, min_lag: int, floor: float = 0.004) -> float:
    """NoRepeat-style score over a whole video: the fraction of frames (after the first `min_lag`) that differ from
    every frame at least `min_lag` earlier by more than half of how much the video typically changes over
    `min_lag` frames (and more than `floor`, so a frozen video counts as repeating). Frozen or looping -> low."""
    x = frames.astype(np.float32) / 255.0
    if len(x) <= min_lag:
        return 1.0
    typical = float(np.abs(x[min_lag:] - x[:-min_lag]).mean())
    threshold = max(0.5 * typical, floor)
    fresh = []
    for t in range(min_lag, len(x)):
        nearest = np.abs(x[: t - min_lag + 1] - x[t]).mean(axis=(1, 2, 3)).min()
        fresh.append(float(nearest > threshold))
    return float(np.mean(fresh))


def fidelity(frames: np.ndarray, spec: WorldSpec, tolerance: float = 0.22) -> float:
    """Do the prompted objects persist with their colours, sizes and speeds? Per object: find the pixels near its
    colour in each frame; score presence x size agreement x speed agreement against the ground truth; average."""
    x = frames.astype(np.float32) / 255.0
    side = x.shape[1]
    scores = []
    for obj in spec.objects:
        colour = np.array(COLOURS[obj.colour], np.float32)
        # Lighting scales an object's colour by a factor a in about [0.65, 1.1]: match pixels to a * colour.
        a = np.clip((x @ colour) / (colour @ colour), 0.65, 1.1)
        near = np.linalg.norm(x - a[..., None] * colour, axis=-1) < tolerance
        true_area = _area(obj.shape, obj.radius) * side * side
        area = near.sum(axis=(1, 2)).astype(np.float32)
        present = (area > 0.35 * true_area) & (area < 2.5 * true_area)
        size_score = np.where(present, np.minimum(area, true_area) / np.maximum(area, true_area), 0.0)
        ys, xs = np.mgrid[:side, :side]
        centroids = np.stack(
            [(near * xs).sum((1, 2)) / np.maximum(area, 1), (near * ys).sum((1, 2)) / np.maximum(area, 1)], -1
        )
        both = present[1:] & present[:-1]
        speed_score = 0.0
        if both.any():
            moved = np.linalg.norm(np.diff(centroids, axis=0), axis=-1)[both].mean()
            true_speed = SPEEDS[obj.speed] * side
            speed_score = float(min(moved, true_speed) / max(moved, true_speed, 1e-6))
        scores.append(float(present.mean()) * float(size_score[present].mean() if present.any() else 0) * speed_score)
    return float(np.mean(scores))


def _area(shape: str, radius: float) -> float:
    if shape == "circle":
        return math.pi * radius**2
    if shape == "square":
        return (2 * radius / 1.15) ** 2
    return 2 * (radius / 0.8) ** 2  # diamond: |x| + |y| < r / 0.8
