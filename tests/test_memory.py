"""The storage tracker and the memory planner."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import launch
from trainer.config import load_config
from trainer.memory import PeakMemory, plan_memory


def test_peak_tracker_follows_storages():
    with PeakMemory() as tracker:
        a = torch.zeros(1000, 1000)  # 4 MB
        b = a + 1  # 4 MB more, then freed
        del b
        c = torch.ones(500, 1000)  # 2 MB
    assert tracker.peak == 8_000_000 and tracker.live == 6_000_000
    del a, c


def test_plan_for_full_vit_e_needs_no_memory():
    overrides = ["backbone.name=vit-e14", "side.width=576", "data.batch_size=1", "data.num_frames=2",
                 "train.frozen_deepspeed_config=deepspeed_configs/frozen_zero3_offload_cpu.json"]  # fmt: skip
    plan = plan_memory(load_config(None, overrides), world_size=8, accelerator=True)
    assert plan.frozen_weights_on == "host"
    assert 4.35e9 * 4 / 8 <= plan.frozen_weights <= 4.45e9 * 4 / 8  # one eighth of the fp32 ViT-E
    assert plan.frozen_gathered > 0 and plan.saved_activations > 0 and plan.accelerator_bytes > 0
    # At most stage3_max_live_parameters (1e8) are gathered at once, plus the all-gather input (1/8 of it).
    assert plan.frozen_gathered <= 1e8 * 4 * (1 + 1 / 8)
    # One image per frozen block call: the block's transient for half the images.
    chunked = plan_memory(load_config(None, [*overrides, "backbone.forward_chunk=1"]), 8, accelerator=True)
    assert chunked.frozen_transient < 0.75 * plan.frozen_transient
    assert chunked.accelerator_bytes <= plan.accelerator_bytes

    nvme = [*overrides[:-1], "train.frozen_deepspeed_config=deepspeed_configs/frozen_zero3_offload_nvme.json"]
    on_nvme = plan_memory(load_config(None, nvme), world_size=8, accelerator=True)
    assert on_nvme.frozen_weights_on == "nvme" and on_nvme.frozen_swap_buffers > 0
    assert on_nvme.host_bytes == on_nvme.frozen_swap_buffers < plan.frozen_weights


PLANNED_RUNS = {
    # The side network under ZeRO-2 beside a whole frozen CLIP.
    "zero2-whole-clip": (1, ["data.batch_size=4"]),
    # A full-width B/16 (two blocks) feeding a d=320 side network under ZeRO-1.
    "zero1-vit-b16": (1, ["backbone.name=vit-b16", "backbone.num_layers=2", "side.width=320",
                          "data.num_frames=4", "data.batch_size=2",
                          "train.deepspeed_config=deepspeed_configs/side_zero1.json"]),
    # A ZeRO-3-partitioned EVA with CPU offload on 2 ranks: gathered and prefetched weights dominate.
    "zero3-offload-2ranks": (2, ["backbone.name=eva-small", "side.width=64", "data.batch_size=4",
                                 "train.frozen_deepspeed_config=deepspeed_configs/frozen_zero3_offload_cpu.json"]),
}  # fmt: skip


@pytest.mark.parametrize("name", PLANNED_RUNS)
def test_plan_matches_measured_training_steps(name, tmp_path):
    # Predicted within 15% of the tensor-level peak of the real trainer (largest over ranks).
    ranks, overrides = PLANNED_RUNS[name]
    out = tmp_path / "plan.json"
    args = ["--config", "configs/demo.yaml", "--cpu", "--measure", "--json", str(out), *overrides]
    result = launch(args, script="launch/plan_memory.py", ranks=ranks, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["world_size"] == ranks
    assert 0.85 <= plan["predicted_over_measured"] <= 1.15, plan
