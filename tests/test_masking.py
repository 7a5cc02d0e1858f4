"""BEVT's masks: budgets met on average, blocks and tubes as specified, draws reproducible from a key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.masking import BlockMasking, MaskConfig, TubeMasking, build_masking, masks_for

GRID = (14, 14)
SLOTS = 8
DRAWS = 10_000


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2D bool mask."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        seen[start], stack, size = True, [start], 0
        while stack:
            i, j = stack.pop()
            size += 1
            for cell in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                inside = 0 <= cell[0] < mask.shape[0] and 0 <= cell[1] < mask.shape[1]
                if inside and mask[cell] and not seen[cell]:
                    seen[cell] = True
                    stack.append(cell)
        sizes.append(size)
    return sizes


def cyclic_runs(column: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1D bool array read as a cycle."""
    if column.all():
        return [len(column)]
    column = np.roll(column, -int(np.argmin(column)))  # start on an unmasked slot: no run is cut in two
    edges = np.diff(np.concatenate([[0], column.astype(int), [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


@pytest.mark.parametrize("slots", [None, SLOTS], ids=["image", "video"])
def test_published_defaults_hit_the_ratio_on_average_and_never_exceed_the_budget(slots):
    cfg = MaskConfig()
    generator = build_masking(cfg, GRID, slots)
    masks = masks_for(generator, DRAWS, 0, 7).numpy()
    assert masks.shape == (DRAWS, *generator.shape) and masks.dtype == bool
    masked = masks.reshape(DRAWS, -1).sum(1)
    ratio = cfg.image_ratio if slots is None else cfg.video_ratio
    assert generator.budget == round(ratio * masks[0].size)  # 98 of 196; 588 of 1568
    assert masked.max() <= generator.budget
    assert abs(masked.mean() / masks[0].size - ratio) < 0.01
    assert (masked == generator.budget).mean() > 0.2  # the budget is met exactly in many draws


def test_masks_are_deterministic_from_seed_and_key():
    for generator in (build_masking(MaskConfig(), GRID, None), build_masking(MaskConfig(), GRID, SLOTS)):
        first = masks_for(generator, 4, 0, 1, 2, 3)
        assert first.dtype == torch.bool and first.shape == (4, *generator.shape)
        assert torch.equal(first, masks_for(generator, 4, 0, 1, 2, 3))
        assert not torch.equal(first, masks_for(generator, 4, 0, 1, 2, 4))  # another step
        assert not torch.equal(first, masks_for(generator, 4, 1, 1, 2, 3))  # another seed
        assert not torch.equal(first[0], first[1])  # draws within a batch differ


def test_every_component_has_at_least_min_block_cells():
    generator = build_masking(MaskConfig(), GRID, None)
    for mask in masks_for(generator, 1000, 0).numpy():
        assert min(components(mask)) >= 16


def test_one_block_budget_gives_one_block():
    generator = BlockMasking(GRID, ratio=16 / 196, min_block=16)  # budget: exactly one block
    masks = masks_for(generator, 500, 0).numpy()
    placed = [mask for mask in masks if mask.any()]
    assert len(placed) > 400  # a block is refused only when its rounded sides overshoot 16 cells
    for mask in placed:
        assert components(mask) == [16]


def test_block_proposals_respect_min_block_and_aspect():
    generator = BlockMasking(GRID, ratio=0.5, min_block=16)
    rng = np.random.default_rng(0)
    boxes = [generator.block(rng.uniform(16, 98), rng.random(4)) for _ in range(5000)]
    sides = np.array([(h, w) for *_, h, w in filter(None, boxes)])
    assert len(sides) > 4000
    assert (sides.prod(1) >= 16).all()
    aspect = sides[:, 0] / sides[:, 1]
    assert (aspect >= 0.3 / 2).all() and (aspect <= 2 / 0.3).all()  # the range, up to rounding one side
    assert (aspect > 2).mean() > 0.05 and (aspect < 0.5).mean() > 0.05  # both tall and wide blocks
    assert abs(np.log(aspect).mean()) < 0.2  # log-uniform about 1


def test_tubes_span_tube_min_to_tube_max_slots_and_wrap_around():
    tube_min, tube_max = 3, 5  # shorter than the 8 slots, so the upper bound means something
    generator = TubeMasking(SLOTS, GRID, 80 / (SLOTS * 196), 16, tube_min=tube_min, tube_max=tube_max)
    assert generator.budget == 16 * tube_max  # about one tube
    lengths, wrapped, single = set(), 0, 0
    for mask in masks_for(generator, 1000, 0).numpy():
        columns = mask.reshape(SLOTS, -1)[:, mask.any(0).ravel()]  # (T, masked cells of the footprint)
        assert min(run for column in columns.T for run in cyclic_runs(column)) >= tube_min
        if len({tuple(column) for column in columns.T}) > 1:
            continue  # two overlapping tubes: a column may hold both
        single += 1
        (run,) = cyclic_runs(columns[:, 0])
        assert tube_min <= run <= tube_max
        lengths.add(run)
        wrapped += bool(columns[0, 0] and columns[-1, 0])
    assert single > 800 and lengths == {3, 4, 5} and wrapped > 50


@pytest.mark.parametrize("slots", [None, 4], ids=["image", "video"])
def test_tiny_grid_hits_its_ratio(slots):
    cfg = MaskConfig(min_block=4, tube_min=2, tube_max=4)
    generator = build_masking(cfg, (6, 6), slots)
    masks = masks_for(generator, DRAWS, 0).numpy()
    ratio = cfg.image_ratio if slots is None else cfg.video_ratio
    assert abs(masks.mean() - ratio) < 0.01


def test_min_block_is_clamped_to_a_small_budget():
    generator = BlockMasking((4, 4), ratio=0.25, min_block=16)  # budget 4 < one published block
    masks = masks_for(generator, 1000, 0).numpy()
    assert generator.min_block == 4 and abs(masks.mean() - 0.25) < 0.01
    tubes = TubeMasking(4, (4, 4), ratio=0.25, min_block=16, tube_min=2, tube_max=4)  # budget 16
    assert tubes.min_block == 8  # one footprint of 8 cells x the shortest tube fits the budget
    masked = masks_for(tubes, 1000, 0).numpy().reshape(1000, -1).sum(1)
    assert masked.max() <= 16 and (masked == 16).mean() > 0.8  # only a 2x4 block x 2 slots fits exactly


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(image_ratio=0.0), "image_ratio"),
        (dict(image_ratio=1.0), "image_ratio"),
        (dict(video_ratio=1.5), "video_ratio"),
        (dict(min_block=0), "min_block"),
        (dict(max_block=8), "max_block"),
        (dict(aspect=[0.0, 1.0]), "aspect"),
        (dict(aspect=[3.0, 0.3]), "aspect"),
        (dict(aspect=[0.3]), "aspect"),
        (dict(tube_min=0), "tube_min"),
        (dict(tube_max=3), "tube_max"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^bevt\.mask\.{key}: "):
        MaskConfig(**overrides)


def test_tubes_longer_than_the_clip_are_refused():
    with pytest.raises(ValueError, match=r"^bevt\.mask\.tube_min: .*\b2 temporal slots"):
        build_masking(MaskConfig(), GRID, 2)
