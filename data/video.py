"""Frame sampling and spatial transforms for one video (opening and decoding it: data.decode).

Workers return uint8 frames; normalisation to floats happens on the training device (``normalize``), so a
batch crosses process boundaries at a quarter of its float size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.decode import VideoDecodeError, open_video, read_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_frames_at(data: bytes, indices: np.ndarray, size: tuple[int, int], threads: int = 1, reader=None):
    """Frames at ``indices`` scaled to ``size`` (height, width) while decoding, as (T, h, w, 3) uint8.

    decord fails to scale to some widths (for example 48: its row-size check), so on failure the frames are
    decoded at full size and resized here instead.
    """
    try:
        return read_frames(reader or open_video(data, threads, size), indices)
    except VideoDecodeError:
        frames = torch.from_numpy(read_frames(open_video(data, threads), indices)).permute(0, 3, 1, 2)
        return resize_uint8(frames, size).permute(0, 2, 3, 1).numpy()


def resize_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, *size) uint8, bilinear and antialiased.

    Interpolating uint8 directly takes torch's vectorised uint8 kernel, which is fastest on channels-last
    memory, the layout of decoded (T, h, w, 3) frames seen as (T, 3, h, w): 7x faster than going via float.
    """
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)


def segment_indices(
    total: int, segments: int, rng: np.random.Generator | None = None, clip: int = 0, clips: int = 1
) -> np.ndarray:
    """TSN sampling: one frame from each of ``segments`` equal segments of ``total`` frames.

    With ``rng`` (training) the frame is uniform within its segment; without it (test) it sits at
    (clip + 0.5) / clips of each segment, so ``clips`` test clips are evenly interleaved.
    """
    if total < segments:
        raise ValueError(f"{total} frames cannot give {segments} segments")
    length = total / segments
    starts = np.arange(segments) * length
    offsets = (
        rng.random(segments) * length if rng is not None else np.full(segments, (clip + 0.5) / clips * length)
    )
    return np.minimum((starts + offsets).astype(np.int64), total - 1)


Box = tuple[int, int, int, int]  # top, left, height, width


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """A box with random area fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = round(np.sqrt(target * aspect))
        h = round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return center_crop_box(height, width)


def center_crop_box(height: int, width: int) -> Box:
    """The centred square of the short side: short-side resize then centre crop, in one box."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def three_crop_boxes(height: int, width: int) -> list[Box]:
    """Start, centre and end squares along the long side (the usual 3-crop test)."""
    side = min(height, width)
    if height >= width:
        return [(top, 0, side, side) for top in (0, (height - side) // 2, height - side)]
    return [(0, left, side, side) for left in (0, (width - side) // 2, width - side)]


def crop_boxes(height: int, width: int, crops: int) -> list[Box]:
    if crops == 1:
        return [center_crop_box(height, width)]
    if crops == 3:
        return three_crop_boxes(height, width)
    raise ValueError(f"test crops must be 1 or 3, got {crops}")


def crop_resize(frames: np.ndarray, box: Box, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) uint8: crop ``box`` and resize it, antialiased."""
    top, left, h, w = box
    clip = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + h, left : left + w]))
    clip = clip.permute(0, 3, 1, 2)  # (T, 3, h, w)
    if (h, w) != (size, size):
        clip = resize_uint8(clip, (size, size))
    return clip.contiguous()


def normalize(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames (..., 3, H, W) -> CLIP-normalised floats of ``dtype``."""
    mean = torch.tensor(CLIP_MEAN, device=frames.device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device, dtype=torch.float32).view(3, 1, 1)
    return ((frames.float() / 255.0 - mean) / std).to(dtype)
