"""BEVT's masks on the token grid: BEiT-style blocks for images, the same blocks as tubes for video.

A mask is a boolean array over tokens (True = masked), one cell per 16x16-pixel token; the published grid is
14x14. Both generators run BEiT's blockwise loop with a budget of ``round(ratio * cells)`` cells:

1. Propose a block: target area uniform between min_block and min(remaining budget, max_block), aspect ratio
   (height / width) log-uniform in ``aspect``, a random position inside the grid.
2. Accept it only if it masks between 1 and ``remaining`` new cells, so the budget is never exceeded.
3. Stop when the budget is met, or when ``attempts`` proposals in a row were refused.

Block sides are rounded up, so a block never falls below its target area. Once less than min_block is left,
the target lies between the remainder and min_block (as with Python's ``random.uniform(a, b)`` for b < a in
BEiT), so every such block is larger than the remainder and is accepted only where it overlaps the mask: the
last cells grow existing blocks and every connected component keeps at least min_block cells. Like BEiT, a
draw sometimes runs out of attempts a few cells short of the budget.

Video (``TubeMasking``) repeats each 2D block over a tube of temporal slots: a random length in
[tube_min, tube_max] from a random start slot, wrapping around (slot ``(start + i) % slots``); the budget and
the acceptance test count space-time cells, and the block's target area is drawn against the remaining
budget divided by the tube's length.

Published defaults: images mask 50% of 14x14 (98 cells), blocks >= 16 cells, aspect 0.3 to 1/0.3; video
masks about 37.5% of 8 slots (16 frames / 2) x 14x14 with tubes of 4 to 8 slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

UNIFORMS_PER_DRAW = 64  # random numbers fetched at once: one Generator call per batch is far cheaper


@dataclass
class MaskConfig:
    """BEVT's masking of image and video tokens (see the module docstring for the algorithm)."""

    image_ratio: float = 0.5
    """Fraction of image cells masked (published: 98 of 14x14)."""
    video_ratio: float = 0.375
    """Fraction of video space-time cells (slots x grid) masked."""
    min_block: int = 16
    """Minimum cells of one 2D block, also of one tube's footprint (clamped to the budget on tiny grids)."""
    max_block: int = 0
    """Maximum cells of one block's footprint; 0 = no cap."""
    aspect: list[float] = field(default_factory=lambda: [0.3, 3.3333])
    """[low, high] range of a block's aspect ratio (height / width), drawn log-uniformly."""
    tube_min: int = 4
    """Shortest tube, in temporal slots."""
    tube_max: int = 8
    """Longest tube, in temporal slots (capped at the clip's slots)."""

    def __post_init__(self):
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
    """BEiT's blockwise mask over an (H, W) token grid.

    Args:
        grid: (H, W) tokens.
        ratio: fraction of cells to mask; the budget is ``round(ratio * H * W)`` cells.
        min_block: smallest block area in cells. Clamped to the budget, so that a grid whose budget is
            smaller than one block still gets (smaller) blocks.
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
        self.min_block = max(1, min(min_block, self.budget))
        self.max_block = max_block or self.height * self.width
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.attempts = attempts

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width)

    def block(self, max_area: float, u: np.ndarray) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of a block from 4 uniforms in [0, 1), or None if it does not fit the grid.

        The target area is uniform between min_block and ``min(max_area, max_block)``, whichever is larger
        (as Python's ``random.uniform`` in BEiT): near the end of the budget blocks shrink towards it.
        """
        area = self.min_block + u[0] * (min(max_area, self.max_block) - self.min_block)
        aspect = math.exp(self.log_aspect[0] + u[1] * (self.log_aspect[1] - self.log_aspect[0]))
        h = max(1, round(math.sqrt(area * aspect)))
        w = math.ceil(area / h)  # ceil, not round: a block never falls below its target area
        if h > self.height or w > self.width:
            return None
        return int(u[2] * (self.height - h + 1)), int(u[3] * (self.width - w + 1)), h, w

    def propose(self, remaining: int, uniforms: _Uniforms) -> tuple | None:
        """Index into the mask of one proposed block, or None if it does not fit."""
        box = self.block(remaining, uniforms.take(4))
        if box is None:
            return None
        top, left, h, w = box
        return slice(top, top + h), slice(left, left + w)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=bool)  # (H, W), or (T, H, W) for tubes
        remaining, refused = self.budget, 0
        uniforms = _Uniforms(rng)
        while remaining > 0 and refused < self.attempts:
            cells = self.propose(remaining, uniforms)
            added = 0
            if cells is not None:
                region = mask[cells]  # a view for blocks, a copy for tubes (index array over slots)
                added = region.size - np.count_nonzero(region)
            if 1 <= added <= remaining:
                mask[cells] = True
                remaining -= added
                refused = 0
            else:
                refused += 1
        return mask


class TubeMasking(BlockMasking):
    """BEVT's tube mask over (T, H, W) = (slots, grid): BEiT blocks repeated over wrapping runs of slots.

    Args:
        slots: temporal token slots T (published: 16 frames / tubelet 2 = 8).
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

    def propose(self, remaining: int, uniforms: _Uniforms) -> tuple | None:
        u = uniforms.take(6)
        length = self.tube_min + int(u[4] * (self.tube_max - self.tube_min + 1))
        box = self.block(remaining / length, u)  # the footprint's share of the space-time budget
        if box is None:
            return None
        top, left, h, w = box
        slots = (int(u[5] * self.slots) + np.arange(length)) % self.slots  # wraps around in time
        return slots, slice(top, top + h), slice(left, left + w)


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


def masks_for(
    generator: Callable[[np.random.Generator], np.ndarray], batch: int, seed: int, *key: int
) -> torch.Tensor:
    """(batch, *mask shape) bool masks drawn from ``default_rng([seed, *key])``: the same (seed, key), e.g.
    key = (rank, step, stream), gives the same masks on any machine and after a resume."""
    rng = np.random.default_rng([seed, *key])
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))


def build_masking(cfg: MaskConfig, grid: tuple[int, int], slots: int | None) -> BlockMasking | TubeMasking:
    """The image generator (``slots`` None) or the video generator over ``slots`` temporal slots."""
    if slots is None:
        return BlockMasking(grid, cfg.image_ratio, cfg.min_block, cfg.max_block, cfg.aspect)
    return TubeMasking(
        slots, grid, cfg.video_ratio, cfg.min_block, cfg.max_block, cfg.aspect, cfg.tube_min, cfg.tube_max
    )
