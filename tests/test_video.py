"""Decoding real H.264 bytes, TSN sampling and the crop boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.synthetic import MOTIONS, _trajectory, encode_mp4, render_clip
from data.video import (
    VideoDecodeError,
    center_crop_box,
    crop_resize,
    normalize,
    open_video,
    random_resized_crop_box,
    read_frames,
    segment_indices,
    three_crop_boxes,
)


def gradient_video(frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i is uniformly grey at level 20 * i: decodable frame identity despite lossy coding."""
    levels = (np.arange(frames) * 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()


def test_decodes_real_h264_bytes_in_order():
    data = encode_mp4(gradient_video(), crf=10)
    assert data[4:8] == b"ftyp"  # a real mp4 container
    reader = open_video(data)
    assert len(reader) == 12
    frames = read_frames(reader, np.array([0, 5, 11]))
    assert frames.shape == (3, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [0, 100, 220], atol=3)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10, encode_mp4(gradient_video())[:300]])
def test_undecodable_bytes_raise_one_error_type(data):
    with pytest.raises(VideoDecodeError):
        read_frames(open_video(data), np.array([0, 1, 2]))


def test_segment_indices_train_and_test():
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = segment_indices(32, 8, rng=rng)
        assert len(idx) == 8 and np.all((idx >= np.arange(8) * 4) & (idx < np.arange(1, 9) * 4))
    assert segment_indices(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]  # segment centres
    two = [segment_indices(32, 8, clip=c, clips=2).tolist() for c in range(2)]
    assert two == [[1, 5, 9, 13, 17, 21, 25, 29], [3, 7, 11, 15, 19, 23, 27, 31]]
    assert segment_indices(8, 8).tolist() == list(range(8))
    with pytest.raises(ValueError):
        segment_indices(7, 8)


def test_crop_boxes():
    assert center_crop_box(120, 160) == (0, 20, 120, 120)
    assert three_crop_boxes(120, 160) == [(0, 0, 120, 120), (0, 20, 120, 120), (0, 40, 120, 120)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(120, 160, rng, (0.3, 1.0), (0.75, 1.333))
        assert top >= 0 and top + h <= 120 and left >= 0 and left + w <= 160
        assert 0.25 <= h * w / (120 * 160) <= 1.0


def test_crop_resize_and_normalize():
    frames = gradient_video(4, 48, 64)
    clip = crop_resize(frames, center_crop_box(48, 64), 32)
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.uint8
    assert clip[2].float().mean().item() == pytest.approx(40, abs=1)
    normed = normalize(clip)
    assert normed.dtype == torch.float32 and normed.shape == clip.shape


def test_synthetic_middle_frame_does_not_reveal_the_class():
    # Paired motions put the object at the same place and size, in distribution, in the middle frame.
    rng = np.random.default_rng(0)
    frames, size = 9, 64

    def middle_stats(motion):
        draws = [_trajectory(motion, rng, size, frames) for _ in range(2000)]
        centres = np.array([c[frames // 2] for c, _ in draws])
        radii = np.array([r[frames // 2] for _, r in draws])
        return centres.mean(0), radii.mean()

    for a, b in [
        ("left", "right"),
        ("up", "down"),
        ("clockwise", "anticlockwise"),
        ("approaching", "receding"),
    ]:
        (centre_a, radius_a), (centre_b, radius_b) = middle_stats(a), middle_stats(b)
        np.testing.assert_allclose(centre_a, centre_b, atol=1.0)
        assert radius_a == pytest.approx(radius_b, abs=0.3)
    clip = render_clip("left", rng, size=size, frames=frames)
    assert clip.shape == (frames, size, size, 3) and clip.dtype == np.uint8
    assert len(MOTIONS) == 8
