"""Augmentation in batch on the device (kornia): one draw per clip, applied alike to all its frames."""

from __future__ import annotations

import json

import pytest
import torch

from data.augment import DeviceAugment
from data.decode import open_video
from data.shards import DataConfig, build_loader
from tests.conftest import TINY_FRAMES, TINY_SIZE, launch, tiny_overrides

DEVICE = dict(augment_on="device", decode_size=[40, 48], hflip=True, color_jitter=0.4, randaugment=[2, 9])


def test_one_draw_per_clip_the_same_on_every_frame():
    torch.manual_seed(0)
    augment = DeviceAugment(DataConfig(**DEVICE), size=TINY_SIZE)
    still = torch.randint(0, 256, (6, 1, 3, 40, 48), dtype=torch.uint8).expand(-1, TINY_FRAMES, -1, -1, -1)
    for _ in range(10):  # RandAugment picks different operations each time
        out = augment(still)
        assert out.shape == (6, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) and out.dtype == torch.uint8
        assert torch.equal(out, out[:, :1].expand_as(out))  # a still clip stays still: same draw per frame
    same_input = still[:1].expand(6, -1, -1, -1, -1)
    out = augment(same_input)
    assert len({out[i].float().sum().item() for i in range(6)}) > 1  # but the draws differ between clips


def test_workers_only_decode_at_decode_size_when_augmenting_on_the_device(tiny_shards):
    cfg = DataConfig(
        train_shards=str(tiny_shards / "train-{000000..000002}.tar"), num_frames=TINY_FRAMES, batch_size=4,
        num_workers=0, **DEVICE,
    )  # fmt: skip
    batch = next(iter(build_loader(cfg, TINY_SIZE, 8, train=True, seed=0, rank=0, world_size=1)))
    assert batch["frames"].shape == (4, TINY_FRAMES, 3, 40, 48) and batch["frames"].dtype == torch.uint8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.augment_on=device"], "needs data.decode_size"),
        (["data.color_jitter=0.4"], "set data.augment_on=device"),
        (["data.augment_on=gpu"], "must be 'cpu' or 'device'"),
    ],
)
def test_augmentation_settings_are_checked(overrides, message):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_training_with_device_augmentation_runs_end_to_end(tiny_shards, tmp_path):
    extra = {f"data.{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in DEVICE.items()}
    result = launch(tiny_overrides(tiny_shards, tmp_path / "run", **extra, **{"train.steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_videos"] == 12


def test_bench_data_measures_every_path(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--frames", "4", "--workers", "1", "--size", "32", "--clips", "8", "--repeats", "1",
            "--synthetic", "8", "64", "8", "--texture", "--short-side", "32", "--json", str(out)]  # fmt: skip
    result = launch(args, script="launch/bench_data.py", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = json.loads(out.read_text())
    for name in ("decord", "pyav", "pipeline_w1", "pipeline_w1_decode_resize", "short32_pipeline_w1"):
        assert record[name] > 0, record
    assert record["short32_over_original_w1"] == record["short32_pipeline_w1"] / record["pipeline_w1"]


def test_bench_data_short_side_shards_hold_the_resized_videos(tmp_path):
    from launch.bench_data import short_side_shards, synthetic_shards, videos_in

    spec = synthetic_shards(tmp_path, videos=4, size=64, frames=6, texture=True)
    (tmp_path / "short").mkdir()
    short = short_side_shards(spec.split("::"), tmp_path / "short", 32)
    originals, resized = videos_in(spec.split("::")), videos_in(short.split("::"))
    assert [key for key, _ in resized] == [key for key, _ in originals]
    for _, video in resized:
        reader = open_video(video)
        assert (len(reader), *reader[0].shape) == (6, 32, 32, 3)
