"""The shard pipeline: batches, counted skips of bad input, exact splits and exact resume."""

from __future__ import annotations

import itertools
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data.shards import DataConfig, DataError, VideoClipDecoder, VideoShards, build_loader, expand_shards
from data.synthetic import encode_mp4, render_clip, synthetic_samples
from data.writer import write_shards
from tests.conftest import TINY_FRAMES, TINY_SIZE


def config(shards, **extra) -> DataConfig:
    values = dict(
        train_shards=str(shards / "train-{000000..000002}.tar"),
        eval_shards=str(shards / "test-{000000..000001}.tar"),
        num_frames=TINY_FRAMES,
        batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
    )
    values.update(extra)
    return DataConfig(**values)


def all_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


def test_training_batches(tiny_shards):
    loader = build_loader(config(tiny_shards), TINY_SIZE, 8, train=True, seed=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["frames"].shape == (4, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
    assert batch["frames"].dtype == torch.uint8 and batch["labels"].dtype == torch.long
    assert batch["state"] == {"epoch": 0, "position": 4, "seen": 4, "skips": {}}


def test_training_stream_is_endless_and_covers_every_sample_each_epoch(tiny_shards):
    loader = build_loader(config(tiny_shards), TINY_SIZE, 8, train=True, seed=0, rank=0, world_size=1)
    keys = [k for batch in itertools.islice(iter(loader), 10) for k in batch["keys"]]  # 40 = 2 epochs of 20
    assert sorted(keys[:20]) == sorted(keys[20:]) and len(set(keys[:20])) == 20
    assert keys[:20] != keys[20:]  # reshuffled per epoch


def test_eval_views(tiny_shards):
    cfg = config(tiny_shards, eval_clips=2, eval_crops=3)
    batch = next(iter(build_loader(cfg, TINY_SIZE, 8, train=False, seed=0, rank=0, world_size=1)))
    assert batch["frames"].shape == (
        4,
        6,
        TINY_FRAMES,
        3,
        TINY_SIZE,
        TINY_SIZE,
    )  # (B, clips x crops, T, 3, H, W)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "patterns", [["test-{000000..000001}.tar"], ["train-{000000..000002}.tar", "test-000000.tar"]]
)
def test_eval_sees_every_sample_exactly_once_across_ranks_and_workers(tiny_shards, workers, patterns):
    # 2 shards < 4 slots exercises the per-sample split; 4 shards = 4 slots the per-shard split.
    spec = "::".join(str(tiny_shards / p) for p in patterns)
    cfg = config(tiny_shards, eval_shards=spec, num_workers=workers)
    single = all_keys(build_loader(cfg, TINY_SIZE, 8, train=False, seed=0, rank=0, world_size=1))
    ranks = [
        all_keys(build_loader(cfg, TINY_SIZE, 8, train=False, seed=0, rank=r, world_size=2)) for r in (0, 1)
    ]
    merged = ranks[0] + ranks[1]
    assert len(merged) == len(set(merged)) == len(single)
    assert set(merged) == set(single)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("consumed", [3, 4])
def test_resume_continues_the_exact_stream(tiny_shards, workers, consumed):
    cfg = config(tiny_shards, num_workers=workers)
    uninterrupted = list(itertools.islice(iter(build_loader(cfg, TINY_SIZE, 8, True, 0, 0, 1)), consumed + 6))
    state = {}
    for batch in uninterrupted[:consumed]:
        state[batch["slot"]] = batch["state"]
    resumed = build_loader(
        cfg, TINY_SIZE, 8, True, 0, 0, 1, resume=state, worker_offset=consumed % max(1, workers)
    )
    after = list(itertools.islice(iter(resumed), 6))
    assert [b["keys"] for b in after] == [b["keys"] for b in uninterrupted[consumed:]]
    for a, b in zip(after, uninterrupted[consumed:], strict=True):
        assert torch.equal(a["frames"], b["frames"])  # the same augmentation too


def test_ranks_get_the_same_number_of_steps_from_unequal_shards(tiny_shards):
    # Training streams are endless: ranks of unequal data share run as many steps as asked.
    cfg = config(tiny_shards, num_workers=2)
    for rank in (0, 1):
        loader = build_loader(cfg, TINY_SIZE, 8, True, 0, rank, 2)
        assert len(list(itertools.islice(iter(loader), 12))) == 12


def planted_shards(tmp_path):
    """Good clips mixed with one of each kind of bad sample, plus a truncated tar."""
    good = list(synthetic_samples(6, seed=3, size=TINY_SIZE, frames=8, prefix="good"))
    rng = np.random.default_rng(0)
    video = good[0][2]
    short = encode_mp4(render_clip("left", rng, size=TINY_SIZE, frames=2))
    bad = [
        ("truncated", "mp4", video[: len(video) // 3], 1, {}),
        ("empty", "mp4", b"", 1, {}),
        ("text", "mp4", b"this is not a video" * 20, 1, {}),
        ("short", "mp4", short, 1, {}),
        ("badlabel", "mp4", video, "seven", {}),
        ("outofrange", "mp4", video, 99, {}),
    ]
    samples = good[:3] + bad + good[3:]
    write_shards(samples, tmp_path, prefix="mixed")
    with wds.TarWriter(str(tmp_path / "mixed-000001.tar")) as sink:
        sink.write({"__key__": "nolabel", "mp4": video})
        sink.write({"__key__": "novideo", "cls": b"2"})
    # A tar cut off in the middle of a member: the samples before the cut are still used.
    good_tar = tmp_path / "extra-000000.tar"
    write_shards(
        synthetic_samples(3, seed=4, size=TINY_SIZE, frames=8, prefix="cut"), tmp_path, prefix="extra"
    )
    with tarfile.open(good_tar) as tar:
        video = tar.getmember("cut000001.mp4")
    cut = video.offset_data + video.size // 2  # inside the second clip's video
    (tmp_path / "mixed-000002.tar").write_bytes(good_tar.read_bytes()[:cut])
    good_tar.unlink()
    return tmp_path / "mixed-{000000..000002}.tar"


def test_bad_input_is_skipped_and_counted_by_kind(tmp_path):
    pattern = planted_shards(tmp_path)
    cfg = config(tmp_path, eval_shards=str(pattern), eval_batch_size=2)
    batches = list(build_loader(cfg, TINY_SIZE, 8, train=False, seed=0, rank=0, world_size=1))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(k for k in keys if k.startswith("good")) == [f"good{i:06d}" for i in range(6)]
    assert [k for k in keys if k.startswith("cut")] == ["cut000000"] and len(keys) == len(set(keys))
    skips = batches[-1]["state"]["skips"]
    assert skips["decode_error"] == 3  # truncated, empty, text
    assert skips["too_few_frames"] == 1
    assert skips["bad_label"] == 2
    assert skips["missing_label"] == 1
    assert (
        skips["missing_video"] == 1
    )  # novideo (the cut clip's label follows its video: nothing of it is read)
    assert skips["broken_shard"] == 1


def test_unreachable_shard_is_counted_not_fatal(tiny_shards):
    urls = [str(tiny_shards / "test-000000.tar"), "file:///nonexistent/shard-000000.tar"]
    decoder = VideoClipDecoder(config(tiny_shards), TINY_SIZE, 8, train=False, seed=0)
    batches = list(DataLoader(VideoShards(urls, decoder, 4, train=False, seed=0), batch_size=None))
    assert sum(len(b["keys"]) for b in batches) == 6
    assert batches[-1]["state"]["skips"] == {"unreachable_shard": 1}


def test_a_dataset_with_no_usable_sample_fails_clearly(tmp_path):
    write_shards([("bad", "mp4", b"junk", 0, {})], tmp_path, prefix="junk")
    loader = build_loader(
        config(tmp_path, train_shards=str(tmp_path / "junk-000000.tar")), TINY_SIZE, 8, True, 0, 0, 1
    )
    with pytest.raises(DataError, match="no usable sample"):
        next(iter(loader))


def test_missing_local_shards_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        expand_shards(str(tmp_path / "x-{0..1}.tar"))
