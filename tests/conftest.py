"""Shared fixtures: tiny synthetic shards and a tiny run config that exercises the whole stack on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import trainer  # noqa: F401  (the package's defaults: DeepSpeed's ops built inside the venv)

REPO = Path(__file__).resolve().parents[1]

# A tiny but complete configuration: 32 px clips of 4 frames, a 2-block CLIP, a 32-wide side network.
TINY_FRAMES = 4
TINY_SIZE = 32


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "backbone.name": "tiny",
        "side.width": 32,
        "side.num_classes": 8,
        "data.train_shards": str(shards / "train-{000000..000002}.tar"),
        "data.eval_shards": str(shards / "test-{000000..000001}.tar"),
        "data.num_frames": TINY_FRAMES,
        "data.batch_size": 4,
        "data.eval_batch_size": 4,
        "data.num_workers": 0,
        "data.shuffle_buffer": 8,
        "train.steps": 4,
        "optim.warmup_steps": 2,
        "metrics.log_every": 1,
        "metrics.progress_bar": False,
        "metrics.tensorboard": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def launch(
    args: list[str], timeout: int = 300, ranks: int = 1, script: str | None = None, env: dict | None = None
):
    """Run launch.train (or ``script``) as real processes: plain python, or ``deepspeed --num_gpus ranks``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), **(env or {})}
    if ranks == 1:
        command = [sys.executable, *([script] if script else ["-m", "launch.train"])]
    else:
        deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        port = str(29500 + os.getpid() % 1000)
        target = [script] if script else ["--module", "launch.train"]
        command = [deepspeed, "--num_gpus", str(ranks), "--master_port", port, *target]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eva_state_dict(model) -> dict:
    """A backbone's weights under EVA-CLIP's checkpoint names (``visual.*``)."""
    from models.eva_vit import EVA_RENAMES

    return {f"visual.{EVA_RENAMES.get(k, k)}": v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """3 unequal training shards (20 clips) and 2 test shards (12 clips) of the synthetic motion task."""
    from data.synthetic import synthetic_samples
    from data.writer import write_shards

    out = tmp_path_factory.mktemp("shards")
    train = list(synthetic_samples(20, seed=0, size=TINY_SIZE, frames=8, prefix="train"))
    for index, part in enumerate((train[:9], train[9:15], train[15:])):
        write_shards(part, out, prefix=f"train-{index:06d}-tmp")
        (out / f"train-{index:06d}-tmp-000000.tar").rename(out / f"train-{index:06d}.tar")
    test = list(synthetic_samples(12, seed=1, size=TINY_SIZE, frames=8, prefix="test"))
    write_shards(test, out, prefix="test", max_count=6)
    return out


@pytest.fixture
def python() -> str:
    return sys.executable


@dataclass
class TrainedRun:
    """A finished tiny run: its run directory and the overrides it was trained (and is evaluated) with."""

    run_dir: Path
    overrides: list[str]
    eval_shards: Path
    """The folder of its evaluation shards, beside a classes.txt."""
    classes: list[str]


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory) -> TrainedRun:
    """One tiny run trained once (4 steps; final evaluation of 2 clips per video with the temporal check),
    its evaluation shards beside a classes.txt naming the synthetic motions."""
    from data.synthetic import MOTIONS

    root = tmp_path_factory.mktemp("trained")
    eval_shards = root / "eval_shards"
    eval_shards.mkdir()
    for shard in tiny_shards.glob("test-*.tar"):
        shutil.copy(shard, eval_shards / shard.name)
    (eval_shards / "classes.txt").write_text("\n".join(MOTIONS) + "\n")
    extra = {"data.eval_shards": str(eval_shards / "test-{000000..000001}.tar"), "data.eval_clips": 2}
    run_dir = root / "run"
    overrides = tiny_overrides(tiny_shards, run_dir, **extra)
    result = launch(overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedRun(run_dir, overrides, eval_shards, list(MOTIONS))
