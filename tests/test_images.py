"""Image shards for BEVT's image stream: batches of single frames, optional labels, counted skips, splits."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.images import build_image_loader
from data.shards import DataConfig
from tests.conftest import REPO

SIZE = 16


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(rng: np.random.Generator, height: int = 40, width: int = 56) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """2 shards: labelled PNGs and JPEGs, unlabelled ones, and one broken sample of each skip kind.

    Returns (shard pattern, {key: label or -1} of the usable samples, expected skip counts).
    """
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    labels = {}
    for shard, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg")]):
        with wds.TarWriter(str(out / f"images-{shard:06d}.tar")) as sink:
            for i in range(6):
                key = f"s{shard}_labelled{i}"
                labels[key] = i % 4
                sink.write({"__key__": key, ext: encode(random_image(rng), fmt), "cls": str(i % 4).encode()})
            key = f"s{shard}_unlabelled"
            labels[key] = -1
            sink.write({"__key__": key, "jpeg" if shard else "png": encode(random_image(rng), fmt)})
            if shard == 0:
                sink.write({"__key__": "corrupt", "jpg": b"\x00\x01 not an image " * 20})
                sink.write({"__key__": "json_only", "json": b'{"caption": "no image here"}'})
            else:
                truncated = encode(random_image(rng, 64, 64), "JPEG")
                sink.write({"__key__": "truncated", "jpg": truncated[: len(truncated) // 2]})
                sink.write({"__key__": "tiny", "png": encode(random_image(rng, 4, 4), "PNG")})
                sink.write({"__key__": "bad_label", "png": encode(random_image(rng), "PNG"), "cls": b"oops"})
    skips = {"decode_error": 3, "missing_image": 1, "bad_label": 1}
    return str(out / "images-{000000..000001}.tar"), labels, skips


def config(**extra) -> DataConfig:
    return DataConfig(**{"num_workers": 0, "shuffle_buffer": 8, **extra})


def loader(
    shards: str, train: bool, num_classes: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1, **cfg
):
    return build_image_loader(
        config(**cfg), shards, 4, SIZE, train, seed, rank, world_size, num_classes=num_classes
    )


def test_eval_batches_labels_and_counted_skips(image_shards):
    shards, labels, skips = image_shards
    batches = list(loader(shards, train=False))
    for batch in batches[:-1]:
        assert batch["frames"].shape == (4, 3, SIZE, SIZE) and batch["frames"].dtype == torch.uint8
        assert batch["labels"].dtype == torch.long
    seen = {k: int(y) for b in batches for k, y in zip(b["keys"], b["labels"], strict=True)}
    assert seen == labels
    assert batches[-1]["state"]["skips"] == skips


def test_labels_are_minus_one_without_classes(image_shards):
    shards, labels, skips = image_shards
    batches = list(loader(shards, train=False, num_classes=0))
    assert sorted(k for b in batches for k in b["keys"]) == sorted([*labels, "bad_label"])
    assert all((b["labels"] == -1).all() for b in batches)
    assert batches[-1]["state"]["skips"] == {k: n for k, n in skips.items() if k != "bad_label"}


def test_train_crops_are_deterministic_for_a_seed(image_shards):
    shards, _, _ = image_shards

    def first(seed: int) -> dict:
        return next(iter(loader(shards, train=True, seed=seed, hflip=True)))

    a, b, other = first(0), first(0), first(1)
    assert a["frames"].shape == (4, 3, SIZE, SIZE) and a["frames"].dtype == torch.uint8
    assert a["keys"] == b["keys"] and torch.equal(a["frames"], b["frames"])
    assert not torch.equal(a["frames"], other["frames"])


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_disjoint_keys(image_shards, workers):
    shards, labels, _ = image_shards
    ranks = [
        [k for b in loader(shards, False, rank=r, world_size=2, num_workers=workers) for k in b["keys"]]
        for r in (0, 1)
    ]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(labels)


def test_make_synthetic_images(tmp_path):
    command = [sys.executable, "-m", "launch.make_synthetic", "--images", "--out", str(tmp_path)]
    command += ["--train", "8", "--test", "4", "--train-shards", "2", "--test-shards", "1", "--size", "32"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.txt",
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
    ]
    for pattern, count in [("train-{000000..000001}.tar", 8), ("test-000000.tar", 4)]:
        batches = list(loader(str(tmp_path / pattern), train=False))
        labels = torch.cat([b["labels"] for b in batches])
        assert len(labels) == count and labels.min() >= 0 and labels.max() < 4
        assert batches[0]["frames"].shape == (4, 3, SIZE, SIZE)
        assert batches[-1]["state"]["skips"] == {}
