"""BEVT's masks: the release's statistics (images: BEiT's blocks; video: one mask over one tube), the earlier
per-block tubes' budgets and shapes, draws reproducible from a key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.masking import BlockMasking, MaskConfig, OneTubeMasking, TubeMasking, build_masking, masks_for

GRID = (14, 14)
SLOTS = 8
DRAWS = 2_000  # as the release's measurement
PER_BLOCK = MaskConfig(video="per_block")


def cyclic_runs(column: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1D bool array read as a cycle."""
    if column.all():
        return [len(column)]
    column = np.roll(column, -int(np.argmin(column)))  # start on an unmasked slot: no run is cut in two
    edges = np.diff(np.concatenate([[0], column.astype(int), [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


def test_released_image_masks_have_the_releases_statistics():
    generator = build_masking(MaskConfig(), GRID, None)
    assert isinstance(generator, BlockMasking) and generator.budget == 98
    rng = np.random.default_rng([0, 7])
    masks, blocks = zip(*(generator.draw(rng) for _ in range(DRAWS)), strict=True)
    masked = np.array(masks).reshape(DRAWS, -1).sum(1)
    assert masked.max() <= 98
    assert abs(masked.mean() / 196 - 0.4975) < 0.01  # RELEASES.md section 4, over 2,000 draws
    assert abs(np.mean(blocks) - 5.16) < 0.3


def test_released_video_masks_have_the_releases_statistics():
    generator = build_masking(MaskConfig(), GRID, SLOTS)
    assert isinstance(generator, OneTubeMasking) and generator.shape == (SLOTS, *GRID)
    masks = masks_for(generator, DRAWS, 0, 7).numpy()  # (draws, 8, 14, 14)
    per_clip = masks.reshape(DRAWS, -1).mean(1)
    assert abs(per_clip.mean() - 0.370) < 0.01
    assert abs(per_clip.std() - 0.088) < 0.015
    unmasked_slots = ~masks.reshape(DRAWS, SLOTS, -1).any(2)
    assert abs(unmasked_slots.mean() - 0.256) < 0.03
    for mask in masks[:200]:  # one 2D mask on the slots of one wrapping tube of 4 to 8 slots
        used = mask.reshape(SLOTS, -1).any(1)
        (run,) = cyclic_runs(used)
        assert 4 <= run <= 8
        planes = mask[used]
        assert (planes == planes[0]).all()


def test_per_block_tubes_hit_the_space_time_budget_on_average():
    generator = build_masking(PER_BLOCK, GRID, SLOTS)
    assert isinstance(generator, TubeMasking)
    masks = masks_for(generator, DRAWS, 0, 7).numpy()
    masked = masks.reshape(DRAWS, -1).sum(1)
    assert generator.budget == round(0.375 * masks[0].size) == 588
    assert masked.max() <= generator.budget
    assert abs(masked.mean() / masks[0].size - 0.375) < 0.01
    assert (masked == generator.budget).mean() > 0.2  # the budget is met exactly in many draws


def test_masks_are_deterministic_from_seed_and_key():
    generators = [build_masking(cfg, GRID, slots) for cfg in (MaskConfig(), PER_BLOCK) for slots in (None, 8)]
    for generator in generators:
        first = masks_for(generator, 4, 0, 1, 2, 3)
        assert first.dtype == torch.bool and first.shape == (4, *generator.shape)
        assert torch.equal(first, masks_for(generator, 4, 0, 1, 2, 3))
        assert not torch.equal(first, masks_for(generator, 4, 0, 1, 2, 4))  # another step
        assert not torch.equal(first, masks_for(generator, 4, 1, 1, 2, 3))  # another seed
        assert not torch.equal(first[0], first[1])  # draws within a batch differ


def test_released_block_proposals_follow_beits_rules():
    generator = BlockMasking(GRID, ratio=0.5, min_block=16)
    rng = np.random.default_rng(0)
    uniforms = rng.random((5000, 4))
    boxes = [generator.block(98, u) for u in uniforms]  # target areas uniform in [16, 98]
    kept = [(16 + u[0] * 82, box) for u, box in zip(uniforms, boxes, strict=True) if box is not None]
    sides = np.array([box[2:] for _, box in kept])
    assert len(sides) > 4000 and sides.max() < 14  # both sides strictly smaller than the grid
    areas = np.array([area for area, _ in kept])
    assert abs(sides.prod(1).mean() / areas.mean() - 1) < 0.05  # rounded sides: the target area on average
    aspect = sides[:, 0] / sides[:, 1]
    assert (aspect >= 0.3 / 2).all() and (aspect <= 2 / 0.3).all()  # the range, up to rounding
    assert (aspect > 2).mean() > 0.05 and (aspect < 0.5).mean() > 0.05  # both tall and wide blocks
    assert abs(np.log(aspect).mean()) < 0.2  # log-uniform about 1
    tops = np.array([box[0] for _, box in kept])
    assert tops.min() == 0 and (tops + sides[:, 0]).max() == 14  # every position, edges included


def test_per_block_tubes_span_tube_min_to_tube_max_slots_and_wrap_around():
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


@pytest.mark.parametrize(
    ("video", "slots", "ratio"),
    [("released", None, 0.5), ("released", 4, 0.5 * 3 / 4), ("per_block", 4, 0.375)],
    ids=["image", "video", "video-per-block"],
)
def test_tiny_grid_hits_its_ratio(video, slots, ratio):
    cfg = MaskConfig(video=video, min_block=4, tube_min=2, tube_max=4)  # the CPU demo's 6x6 grid, 4 slots
    masks = masks_for(build_masking(cfg, (6, 6), slots), DRAWS, 0).numpy()
    assert abs(masks.mean() - ratio) < 0.01


def test_per_block_min_block_is_clamped_to_a_small_budget():
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
        (dict(video="tubes"), "video"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^bevt\.mask\.{key}: "):
        MaskConfig(**overrides)


@pytest.mark.parametrize("cfg", [MaskConfig(), PER_BLOCK], ids=["released", "per_block"])
def test_tubes_longer_than_the_clip_are_refused(cfg):
    with pytest.raises(ValueError, match=r"^bevt\.mask\.tube_min: .*\b2 temporal slots"):
        build_masking(cfg, GRID, 2)
