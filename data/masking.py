"""BEVT's masks on the token grid: BEiT's blocks for images; for video, by default one such mask per clip
repeated over one tube of temporal slots (BEVT's release, RELEASES.md section 4).

A mask is a boolean array over tokens (True = masked), one cell per 16x16-pixel token; the published grid is
14x14. Images (``BlockMasking``) run BEiT's blockwise loop with a budget of ``round(ratio * cells)`` cells:

1. Propose a block: target area uniform between min_block and the remaining budget (capped at max_block;
   when less than min_block is left, between the two, as Python's ``random.uniform(a, b)`` for b < a),
   aspect ratio (height / width) log-uniform in ``aspect``, h = round(sqrt(area * aspect)),
   w = round(sqrt(area / aspect)), kept only when h and w are both smaller than the grid's sides; top and
   left uniform.
2. Accept it only if it masks between 1 and ``remaining`` new cells, so the budget is never exceeded.
3. Stop when the budget is met, or when ``attempts`` (10) proposals in a row were refused.

Over 2,000 draws of the published 98 of 14x14 cells this masks 0.4975 of the grid in 5.16 blocks on average,
the release's figures.

Video, ``bevt.mask.video``:
- ``released`` (``OneTubeMasking``): one image mask per clip (``image_ratio``), repeated over ONE tube of
  temporal slots: a random length in [tube_min, tube_max] from a random start slot, wrapping around (slot
  ``(start + i) % slots``). Published: 4-8 of 8 slots, so 0.4975 x 6 / 8 = 0.37 of space-time on average
  (per-clip standard deviation 0.088), and a quarter of the slots left unmasked.
- ``per_block`` (``TubeMasking``, the project's earlier masks): every 2D block gets its own tube, against a
  space-time budget of ``round(video_ratio * slots * cells)``; the block's target area is drawn against the
  remaining budget divided by the tube's length, and block sides are rounded up (a block never falls below
  its target area; min_block is clamped so that one tube fits a tiny budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

UNIFORMS_PER_DRAW = 64  # random numbers fetched at once: one Generator call per batch is far cheaper
VIDEO_MASKS = ("released", "per_block")


@dataclass
class MaskConfig:
    """BEVT's masking of image and video tokens (see the module docstring for the algorithms)."""

    video: str = "released"
    """Video masks: released (one image mask per clip over one wrapping tube of tube_min..tube_max slots, as
    BEVT's release) or per_block (each block its own tube, budget video_ratio; the project's earlier
    masks)."""
    image_ratio: float = 0.5
    """Fraction of image cells masked (published: 98 of 14x14); also the 2D mask of released video masks."""
    video_ratio: float = 0.375
    """Fraction of video space-time cells (slots x grid) masked by per_block video masks (released ones mask
    image_ratio x the mean tube length / slots on average)."""
    min_block: int = 16
    """Minimum target area of one 2D block, in cells."""
    max_block: int = 0
    """Maximum cells of one block's footprint; 0 = no cap."""
    aspect: list[float] = field(default_factory=lambda: [0.3, 3.3333])
    """[low, high] range of a block's aspect ratio (height / width), drawn log-uniformly."""
    tube_min: int = 4
    """Shortest tube, in temporal slots."""
    tube_max: int = 8
    """Longest tube, in temporal slots (capped at the clip's slots)."""

    def __post_init__(self):
        if self.video not in VIDEO_MASKS:
            raise ValueError(f"bevt.mask.video: {self.video!r} is not one of {VIDEO_MASKS}")
        check_block_args("image_ratio", self.image_ratio, self.min_block, self.max_block, self.aspect)
        check_block_args("video_ratio", self.video_ratio, self.min_block, self.max_block, self.aspect)
        check_tube_args(self.tube_min, self.tube_max)


def check_block_args(
    ratio_key: str, ratio: float, min_block: int, max_block: int, aspect: Sequence[float]
) -> None:
    """Raise a ValueError naming the ``bevt.mask.*`` key of a ratio, block size or aspect out of range."""
    if not 0 < ratio < 1:
        raise ValueError(f"bevt.mask.{ratio_key}: must be within (0, 1), got {ratio}")
    if min_block < 1:
        raise ValueError(f"bevt.mask.min_block: must be >= 1, got {min_block}")
    if max_block != 0 and max_block < min_block:
        raise ValueError(
            f"bevt.mask.max_block: must be 0 (no cap) or >= min_block ({min_block}), got {max_block}"
        )
    if len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"bevt.mask.aspect: must be [low, high] with 0 < low <= high, got {list(aspect)}")


def check_tube_args(tube_min: int, tube_max: int, slots: int | None = None) -> None:
    """Raise a ValueError naming the ``bevt.mask.*`` key of a tube length out of range or beyond slots."""
    if tube_min < 1:
        raise ValueError(f"bevt.mask.tube_min: must be >= 1, got {tube_min}")
    if tube_max < tube_min:
        raise ValueError(f"bevt.mask.tube_max: must be >= tube_min ({tube_min}), got {tube_max}")
    if slots is not None and tube_min > slots:
        raise ValueError(f"bevt.mask.tube_min: {tube_min} is longer than the clip's {slots} temporal slots")


class BlockMasking:
    """BEiT's blockwise mask over an (H, W) token grid, as BEVT's release draws it for images.

    Args:
        grid: (H, W) tokens.
        ratio: fraction of cells to mask; the budget is ``round(ratio * H * W)`` cells.
        min_block: smallest target area of a block, in cells.
        max_block: largest block area in cells; 0 = no cap.
        aspect: (low, high) range of height / width, drawn log-uniformly.
        attempts: refused proposals in a row after which the mask is returned as it is.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        ratio: float,
        min_block: int,
        max_block: int = 0,
        aspect: Sequence[float] = (0.3, 1 / 0.3),
        attempts: int = 10,
    ):
        check_block_args("image_ratio", ratio, min_block, max_block, aspect)
        self.height, self.width = grid
        self.budget = round(ratio * self.height * self.width)
        self.min_block = min_block
        self.max_block = max_block or self.height * self.width
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.attempts = attempts

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width)

    def target(self, max_area: float, u: np.ndarray) -> tuple[float, float]:
        """(area, aspect) from 2 uniforms: area uniform between min_block and ``max_area``, whichever is
        larger (as Python's ``random.uniform`` in BEiT), aspect log-uniform."""
        area = self.min_block + u[0] * (max_area - self.min_block)
        return area, math.exp(self.log_aspect[0] + u[1] * (self.log_aspect[1] - self.log_aspect[0]))

    def block(self, max_area: float, u: np.ndarray) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of a block from 4 uniforms in [0, 1), or None if it does not fit the grid."""
        area, aspect = self.target(max_area, u)
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h < self.height and 0 < w < self.width):  # strictly smaller than the grid, as BEiT
            return None
        return int(u[2] * (self.height - h + 1)), int(u[3] * (self.width - w + 1)), h, w

    def propose(self, remaining: int, uniforms: _Uniforms) -> tuple | None:
        """(index into the mask of one proposed block, most new cells it may add), or None if it does not
        fit."""
        limit = min(remaining, self.max_block)
        box = self.block(limit, uniforms.take(4))
        if box is None:
            return None
        top, left, h, w = box
        return (slice(top, top + h), slice(left, left + w)), limit

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(mask, number of blocks placed)."""
        mask = np.zeros(self.shape, dtype=bool)  # (H, W), or (T, H, W) for tubes
        remaining, refused, blocks = self.budget, 0, 0
        uniforms = _Uniforms(rng)
        while remaining > 0 and refused < self.attempts:
            proposal = self.propose(remaining, uniforms)
            added, limit = 0, 0
            if proposal is not None:
                cells, limit = proposal
                region = mask[cells]  # a view for blocks, a copy for tubes (index array over slots)
                added = region.size - np.count_nonzero(region)
            if 1 <= added <= limit:
                mask[cells] = True
                remaining -= added
                refused, blocks = 0, blocks + 1
            else:
                refused += 1
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.draw(rng)[0]


class OneTubeMasking:
    """BEVT's released video mask over (T, H, W) = (slots, grid): one ``BlockMasking`` mask per clip on the
    slots of one tube (random length in [tube_min, tube_max], random start, wrapping around); the other
    slots are unmasked.

    Args:
        slots: temporal token slots T (published: 16 frames / tubelet 2 = 8).
        grid, ratio, min_block, max_block, aspect, attempts: the 2D mask's, as in ``BlockMasking``.
        tube_min, tube_max: tube length range in slots; tube_max is capped at ``slots``.
    """

    def __init__(
        self,
        slots: int,
        grid: tuple[int, int],
        ratio: float,
        min_block: int,
        max_block: int = 0,
        aspect: Sequence[float] = (0.3, 1 / 0.3),
        tube_min: int = 4,
        tube_max: int = 8,
        attempts: int = 10,
    ):
        check_tube_args(tube_min, tube_max, slots)
        self.plane = BlockMasking(grid, ratio, min_block, max_block, aspect, attempts)
        self.slots = slots
        self.tube_min, self.tube_max = tube_min, min(tube_max, slots)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.slots, *self.plane.shape)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(mask, number of 2D blocks)."""
        plane, blocks = self.plane.draw(rng)
        u = rng.random(2)
        length = self.tube_min + int(u[0] * (self.tube_max - self.tube_min + 1))
        mask = np.zeros(self.shape, dtype=bool)
        mask[(int(u[1] * self.slots) + np.arange(length)) % self.slots] = plane  # wraps around in time
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.draw(rng)[0]


class TubeMasking(BlockMasking):
    """The project's earlier video mask (``bevt.mask.video: per_block``) over (T, H, W) = (slots, grid):
    blocks, each repeated over its own wrapping run of slots, against a space-time budget.

    Args:
        slots: temporal token slots T.
        grid: (H, W) tokens per slot.
        ratio: fraction of space-time cells to mask; the budget is ``round(ratio * T * H * W)`` cells.
        min_block, max_block, aspect, attempts: as in ``BlockMasking``, for a tube's 2D footprint; min_block
            is clamped so that one tube of tube_min slots fits the budget.
        tube_min, tube_max: tube length range in slots; tube_max is capped at ``slots``.
    """

    def __init__(
        self,
        slots: int,
        grid: tuple[int, int],
        ratio: float,
        min_block: int,
        max_block: int = 0,
        aspect: Sequence[float] = (0.3, 1 / 0.3),
        tube_min: int = 4,
        tube_max: int = 8,
        attempts: int = 10,
    ):
        check_block_args("video_ratio", ratio, min_block, max_block, aspect)
        check_tube_args(tube_min, tube_max, slots)
        super().__init__(grid, ratio, min_block, max_block, aspect, attempts)
        self.slots = slots
        self.budget = round(ratio * slots * self.height * self.width)
        self.min_block = max(1, min(min_block, self.budget // tube_min))
        self.tube_min, self.tube_max = tube_min, min(tube_max, slots)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.slots, self.height, self.width)

    def block(self, max_area: float, u: np.ndarray) -> tuple[int, int, int, int] | None:
        """As ``BlockMasking.block`` but the width is rounded up (a block never falls below its target
        area) and a block may span the grid."""
        area, aspect = self.target(min(max_area, self.max_block), u)
        h = max(1, round(math.sqrt(area * aspect)))
        w = math.ceil(area / h)
        if h > self.height or w > self.width:
            return None
        return int(u[2] * (self.height - h + 1)), int(u[3] * (self.width - w + 1)), h, w

    def propose(self, remaining: int, uniforms: _Uniforms) -> tuple | None:
        u = uniforms.take(6)
        length = self.tube_min + int(u[4] * (self.tube_max - self.tube_min + 1))
        box = self.block(remaining / length, u)  # the footprint's share of the space-time budget
        if box is None:
            return None
        top, left, h, w = box
        slots = (int(u[5] * self.slots) + np.arange(length)) % self.slots  # wraps around in time
        return (slots, slice(top, top + h), slice(left, left + w)), remaining


class _Uniforms:
    """Uniform [0, 1) numbers drawn from ``rng`` in batches and handed out a few at a time."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.values = rng.random(UNIFORMS_PER_DRAW)
        self.next = 0

    def take(self, n: int) -> np.ndarray:
        if self.next + n > len(self.values):
            self.values, self.next = self.rng.random(UNIFORMS_PER_DRAW), 0
        self.next += n
        return self.values[self.next - n : self.next]


Masking = BlockMasking | OneTubeMasking | TubeMasking


def masks_for(generator: Callable[[np.random.Generator], np.ndarray], batch: int, seed: int, *key: int):
    """(batch, *mask shape) bool masks drawn from ``default_rng([seed, *key])``: the same (seed, key), e.g.
    key = (rank, step, stream), gives the same masks on any machine and after a resume."""
    rng = np.random.default_rng([seed, *key])
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))


def build_masking(cfg: MaskConfig, grid: tuple[int, int], slots: int | None) -> Masking:
    """The image generator (``slots`` None) or the video generator (``cfg.video``) over ``slots`` slots."""
    blocks = (cfg.min_block, cfg.max_block, cfg.aspect)
    if slots is None:
        return BlockMasking(grid, cfg.image_ratio, *blocks)
    if cfg.video == "per_block":
        return TubeMasking(slots, grid, cfg.video_ratio, *blocks, cfg.tube_min, cfg.tube_max)
    return OneTubeMasking(slots, grid, cfg.image_ratio, *blocks, cfg.tube_min, cfg.tube_max)
