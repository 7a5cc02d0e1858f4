"""The whole stack through its entry point, as real processes: one rank, and two ranks under DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.writer import write_shards
from tests.conftest import REPO, launch, records, tiny_overrides


def test_single_process_run_writes_the_run_directory_and_counts_bad_samples(tiny_shards, tmp_path):
    bad = tmp_path / "bad"
    write_shards(
        [("junk", "mp4", b"not a video" * 9, 1, {}), ("nolabel", "mp4", b"", "x", {})], bad, prefix="bad"
    )
    run_dir = tmp_path / "run"
    train = f"{tiny_shards}/train-{{000000..000002}}.tar::{bad}/bad-000000.tar"
    # 6 steps x 4 clips > one epoch of 20 good samples, so the two bad ones have been met.
    extra = {"data.train_shards": train, "train.steps": 6, "checkpoint.every": 3, "metrics.tensorboard": True}
    result = launch(tiny_overrides(tiny_shards, run_dir, **extra))
    assert result.returncode == 0, result.stderr[-3000:]

    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    train_records = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["clips_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in train_records)
    last = train_records[-1]
    assert last["skipped/decode_error"] >= 1 and last["skipped/bad_label"] >= 1
    assert last["skipped"] == last["skipped/decode_error"] + last["skipped/bad_label"]

    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["num_videos"] == 12 and evaluation["step"] == 6
    for key in ("top1", "top5", "top1_frame_shuffled", "top1_single_frame"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert set(evaluation["skipped_train_samples"]) == {"decode_error", "bad_label"}
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000003", "step00000006"]


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(tiny_shards, tmp_path):
    """DeepSpeed takes its JIT op's lock file in every process; a rank killed meanwhile leaves it behind.
    Runs load the built op directly instead, so they start anyway."""
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if not (built / "deepspeed_shm_comm.so").is_file():
        pytest.skip("DeepSpeed's CPU comm op is not built (`make install` builds it)")
    extensions = tmp_path / "extensions"
    shutil.copytree(built, extensions / "deepspeed_shm_comm")
    (extensions / "deepspeed_shm_comm" / "lock").touch()  # as a killed process leaves it
    args = tiny_overrides(tiny_shards, tmp_path / "run", **{"train.steps": 2, "eval.temporal_check": False})
    result = launch(args, timeout=180, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "eval.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.stpes=3"], "train.stpes"),
        (["data.batch_size=many"], "data.batch_size"),
        (["--config", "configs/missing.yaml"], "configs/missing.yaml"),
    ],
)
def test_config_errors_exit_cleanly(args, message):
    result = launch(args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_shards_exit_cleanly(tiny_shards, tmp_path):
    args = tiny_overrides(
        tiny_shards, tmp_path / "run", **{"data.train_shards": str(tmp_path / "none-{0..3}.tar")}
    )
    result = launch(args, timeout=120)
    assert result.returncode == 2
    assert "4 of 4 shards do not exist" in result.stderr and "Traceback" not in result.stderr


def test_two_rank_deepspeed_run_resumes_with_the_same_next_step_loss(tiny_shards, tmp_path):
    common = {
        "train.steps": 6,
        "checkpoint.every": 3,
        "checkpoint.keep": 3,
        "data.num_workers": 2,
        "eval.temporal_check": False,
    }
    full = tmp_path / "full"
    result = launch(tiny_overrides(tiny_shards, full, **common), ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout + result.stderr
    # Both ranks wrote their optimizer partition and their own data position.
    checkpoint = full / "checkpoints" / "step00000003"
    assert len(list(checkpoint.glob("*optim_states.pt"))) == 2
    assert len(list(checkpoint.glob("train_state_rank*.json"))) == 2

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    (resumed / "checkpoints" / "latest").write_text(checkpoint.name)
    result = launch(tiny_overrides(tiny_shards, resumed, **common), ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    full_losses = {r["step"]: r["loss"] for r in records(full) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in records(resumed) if "loss" in r}
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-6)
    assert full_losses[4] != pytest.approx(full_losses[1])


def test_sigterm_saves_at_a_step_boundary_and_the_rerun_resumes(tiny_shards, tmp_path):
    # What a scheduler's preemption does, without SLURM: SIGTERM mid-run -> checkpoint, exit code 3.
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_shards, run_dir, **{"train.steps": 400})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or "loss" not in (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 3, output[-2000:]
    stopped = (run_dir / "checkpoints" / "latest").read_text()
    step = int(stopped.removeprefix("step"))
    assert f"step {step}: stopped by a signal" in output and 0 < step < 400

    result = launch(tiny_overrides(tiny_shards, run_dir, **{"train.steps": step + 2}))
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert logged == list(range(1, step + 3))  # resumed after the saved step: nothing repeated or lost
