"""WebDataset tar shards of images -> batches of uint8 images (BEVT's image stream).

A sample is ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) + optional ``KEY.cls`` (integer label). Images
stream through ``data.shards.VideoShards`` exactly as clips do (slots, shuffling, counted skips, resume); only
the decoder differs. One image becomes (3, S, S) uint8, the layout of one video frame, so a batch
(B, 3, S, S) can be handled like frames.

Images are always cropped in the workers: ``augment_on``, ``decode_size`` and ``eval_crops`` apply to clips.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from data.shards import ClassLabel, DataConfig, SkipSample, expand_shards, sample_rng, shard_loader
from data.video import center_crop_box, crop_resize, random_resized_crop_box

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MIN_SIDE = 8  # pixels; smaller images are thumbnails or broken files, not training data
# What Pillow raises for bytes it cannot read: UnidentifiedImageError and "image file is truncated" are
# OSErrors; malformed chunks surface as SyntaxError, ValueError or EOFError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SkipSample(
        "missing_image", f"no image member among {sorted(k for k in sample if not k.startswith('__'))}"
    )


def decode_image(data: bytes, min_side: int) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB. JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) when both
    sides stay >= ``min_side``: far cheaper than decoding at full size and resizing afterwards."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                raise SkipSample(
                    "decode_error", f"image is {width}x{height}, smaller than {MIN_SIDE} px a side"
                )
            image.draft("RGB", (min_side, min_side))
            return np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    except UnidentifiedImageError as exc:
        raise SkipSample("decode_error", "not in an image format Pillow can read") from exc
    except DECODE_ERRORS as exc:
        raise SkipSample("decode_error", f"{type(exc).__name__}: {str(exc)[:200]}") from exc


class ImageDecoder:
    """Raw sample dict -> ((3, S, S) uint8, label). Training: random resized crop (+ flip if ``cfg.hflip``);
    evaluation: the centre crop.

    The label is -1 when the sample has no ``.cls`` or ``num_classes`` is 0 (labels are optional for
    images); a ``.cls`` that is not an integer in [0, num_classes) is a ``bad_label`` skip.
    """

    def __init__(self, cfg: DataConfig, image_size: int, train: bool, seed: int, num_classes: int = 0):
        self.cfg, self.size, self.train, self.seed = cfg, image_size, train, seed
        self.num_classes = num_classes
        self.labels = ClassLabel(num_classes)
        # Decode large enough that the smallest training crop still has about S pixels a side.
        self.decode_side = math.ceil(image_size / math.sqrt(cfg.train_scale[0])) if train else image_size

    def collate(self, targets: list[int]) -> dict:
        return self.labels.collate(targets)  # "labels" (B,)

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, int]:
        label = self.labels(sample, None) if self.num_classes and "cls" in sample else -1
        pixels = decode_image(image_bytes(sample), self.decode_side)[None]  # (1, H, W, 3)
        height, width = pixels.shape[1:3]
        if not self.train:
            return crop_resize(pixels, center_crop_box(height, width), self.size)[0], label
        rng = sample_rng(self.seed, epoch, sample["__key__"])
        box = random_resized_crop_box(
            height, width, rng, tuple(self.cfg.train_scale), tuple(self.cfg.train_ratio)
        )
        image = crop_resize(pixels, box, self.size)[0]  # (3, S, S)
        if self.cfg.hflip and rng.random() < 0.5:
            image = image.flip(-1)
        return image, label


def build_image_loader(
    cfg: DataConfig,
    shards: str,
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    rank: int,
    world_size: int,
    resume: dict[int, dict] | None = None,
    worker_offset: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
    num_classes: int = 0,
) -> DataLoader:
    """The training (endless) or evaluation (one pass) image loader of one rank, over ``shards`` (a path,
    brace pattern, or several joined by '::'); ``cfg`` gives workers, shuffling, crops and skip limits.

    Batches: "frames" (B, 3, S, S) uint8, "labels" (B,) (-1 where unlabelled), "keys", "slot", "state".
    """
    urls = expand_shards(shards, cfg.allow_pipe)
    decoder = ImageDecoder(cfg, image_size, train, seed, num_classes)
    return shard_loader(
        cfg, urls, decoder, batch_size, train, seed, rank, world_size, resume, worker_offset, worker_init_fn
    )
