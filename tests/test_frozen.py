"""The frozen backbone partitioned with ZeRO-3 inference (CPU and NVMe offload), as real 2-rank runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models import BackboneConfig, build_backbone
from tests.conftest import eva_state_dict, launch, records, tiny_overrides


def write_eva_checkpoint(path, name: str):
    """An EVA-CLIP checkpoint with non-trivial weights, under EVA's ``visual.*`` keys."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name=name))
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    torch.save(eva_state_dict(model), path)
    return path


@pytest.fixture(scope="module")
def eva_checkpoint(tmp_path_factory):
    return write_eva_checkpoint(tmp_path_factory.mktemp("eva") / "eva_tiny.pt", "eva-tiny")


def async_io_available() -> bool:
    """Whether the async_io op is built already (`make test` builds it first, with a time limit)."""
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory("async_io", verbose=False)) / "async_io.so").exists()


# NVMe uses a wider model: DeepSpeed keeps partitions under 1 MiB in memory instead of swapping them. With CPU
# offload the partitioned blocks also run 3 of the 4 images at a time (each block called twice per forward).
@pytest.mark.parametrize(("offload", "name", "chunk"), [("cpu", "eva-tiny", 3), ("nvme", "eva-small", 0)])
def test_partitioned_taps_equal_the_plain_model(tmp_path, offload, name, chunk):
    if offload == "nvme" and not async_io_available():
        pytest.skip(
            "DeepSpeed's async_io op is not built (`make test` builds it; it needs libaio-dev, "
            "which make adds as root)"
        )
    checkpoint = write_eva_checkpoint(tmp_path / "eva.pt", name)
    args = [
        "--out", str(tmp_path / "out"),
        f"backbone.name={name}", f"backbone.pretrained={checkpoint}", "backbone.tap_every=1",
        f"train.frozen_deepspeed_config=deepspeed_configs/frozen_zero3_offload_{offload}.json",
        f"train.offload_dir={tmp_path / 'nvme'}", f"backbone.forward_chunk={chunk}",
    ]  # fmt: skip
    result = launch(args, ranks=2, script="tests/dist_frozen.py", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["partitioned"]
        assert rank["max_abs_diff"] <= 1e-5
        assert rank["resident_bytes"] <= rank["total_bytes"] / rank["world"] + rank["block_bytes"]
    if offload == "nvme":  # seen from inside the run: DeepSpeed deletes its swap files at exit
        for rank in ranks:
            assert rank["nvme_params"] > 0
            assert any(f.endswith("_param.tensor.swp") for f in rank["swap_files"])
            assert rank["resident_bytes"] < rank["total_bytes"] / rank["world"]  # the rest lives on disk


def test_side_training_against_a_partitioned_backbone_resumes_and_uneven_eval_ends(
    tiny_shards, eva_checkpoint, tmp_path
):
    common = {
        "backbone.name": "eva-tiny",
        "backbone.pretrained": str(eva_checkpoint),
        "train.frozen_deepspeed_config": "deepspeed_configs/frozen_zero3_offload_cpu.json",
        "train.steps": 4,
        "checkpoint.every": 2,
        "checkpoint.keep": 2,
        # 3 shards of 9, 6 and 5 clips over 2 ranks: rank 0 evaluates 14 clips, rank 1 only 6.
        "data.eval_shards": str(tiny_shards / "train-{000000..000002}.tar"),
    }
    full = tmp_path / "full"
    result = launch(tiny_overrides(tiny_shards, full, **common), ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((full / "eval.json").read_text())
    assert evaluation["num_videos"] == 20  # every clip once, although the ranks' shares differ

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    result = launch(tiny_overrides(tiny_shards, resumed, **common), ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {r["step"]: r["loss"] for r in records(full) if "loss" in r}
    got = {r["step"]: r["loss"] for r in records(resumed) if "loss" in r}
    assert sorted(got) == [3, 4]
    assert got[3] == pytest.approx(expected[3], rel=1e-6) and got[4] == pytest.approx(expected[4], rel=1e-6)


def test_depth_reduced_vit_e_trains_side_steps_under_zero3_cpu_offload(tiny_shards, tmp_path):
    overrides = tiny_overrides(
        tiny_shards,
        tmp_path / "run",
        **{
            "backbone.name": "vit-e14",  # full width 1792, MLP 15360, 224 px
            "backbone.num_layers": 2,  # taps block 1 (odd indices): one side block
            "side.width": 576,
            "train.frozen_deepspeed_config": "deepspeed_configs/frozen_zero3_offload_cpu.json",
            "train.steps": 2,
            "data.num_frames": 2,
            "data.batch_size": 1,
            "data.eval_batch_size": 2,
            "data.eval_shards": str(tiny_shards / "test-000000.tar"),
            "eval.temporal_check": False,
        },
    )
    result = launch(overrides, ranks=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "taps [1]" in out and "2 rank(s)" in out
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
