"""The trainer under faults, through its entry point as real processes: every exit is an exit, checkpoints
are never lost, divergence is noticed, a full disk is named. Every process is bounded by a timeout."""

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
import torch

from data.writer import write_shards
from tests.conftest import REPO, launch, records, tiny_overrides
from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointConfig, Checkpointer, newest_complete, resume_candidates
from trainer.distributed import DistInfo

QUICK = {"eval.temporal_check": False}


def popen(args: list[str]) -> subprocess.Popen:
    """launch.train in a session of its own (so its whole process group can be signalled)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A shell's background job ignores SIGINT and its children inherit that: give Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"condition not met (exit {process.poll()}): {process.communicate()[1][-2000:]}")
        time.sleep(0.1)


def group_gone(pgid: int, timeout: float = 10) -> bool:
    """Whether every process of the group (the trainer and its loader workers) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False


def training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text()


# -- every exit is an exit -----------------------------------------------------------------------------------


def test_a_training_set_without_a_usable_sample_is_a_data_error_with_workers(tiny_shards, tmp_path):
    bad = tmp_path / "bad"
    write_shards([(f"junk{i}", "mp4", b"not a video", 1, {}) for i in range(3)], bad, prefix="bad")
    extra = {"data.train_shards": str(bad / "bad-000000.tar"), "data.num_workers": 2, **QUICK}
    result = launch(tiny_overrides(tiny_shards, tmp_path / "run", **extra), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data error:" in result.stderr and "no usable sample" in result.stderr
    assert "Traceback" not in result.stderr


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.parametrize("target", ["main process", "process group", "a loader worker"])
def test_ctrl_c_or_a_dead_worker_stops_the_run_and_its_workers(tiny_shards, tmp_path, target):
    run_dir = tmp_path / "run"
    process = popen(tiny_overrides(tiny_shards, run_dir, **{"train.steps": 1000, "data.num_workers": 2}))
    wait_for(lambda: training(run_dir), process)
    if target == "main process":
        process.send_signal(signal.SIGINT)
    elif target == "process group":
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        os.kill(children(process.pid)[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    if target == "a loader worker":
        assert process.returncode == 1 and last.startswith("error: ") and "worker" in last, stderr[-2000:]
    else:
        assert process.returncode == 130 and "interrupted" in last, stderr[-2000:]
    assert "Traceback" not in stderr
    assert group_gone(process.pid), "loader workers outlived the trainer"


# -- checkpoints are never lost ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished 4-step run with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    extra = {"checkpoint.every": 2, "checkpoint.keep": 3, **QUICK}
    result = launch(tiny_overrides(tiny_shards, run_dir, **extra), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.parametrize("latest", ["", "garbage\x00\n", None])
def test_an_unreadable_latest_pointer_neither_hides_nor_deletes_checkpoints(finished_run, tmp_path, latest):
    run_dir = copy_run(finished_run, tmp_path)
    pointer = run_dir / "checkpoints" / "latest"
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_text(latest)
    assert newest_complete(run_dir / "checkpoints") == run_dir / "checkpoints" / "step00000004"
    checkpointer = Checkpointer(CheckpointConfig(), run_dir, DistInfo(0, 0, 1, torch.device("cpu")))
    checkpointer._tidy()  # what resume does before choosing
    assert step_dirs(run_dir) == ["step00000002", "step00000004"]


def test_resume_without_latest_continues_from_the_newest_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "checkpoints" / "latest").unlink()
    extra = {"train.steps": 5, "checkpoint.every": 2, "checkpoint.keep": 3, **QUICK}
    result = launch(tiny_overrides(tiny_shards_of(run_dir), run_dir, **extra), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step00000004 at step 4" in result.stderr
    assert [r["step"] for r in records(run_dir) if "loss" in r][-1:] == [5]
    assert step_dirs(run_dir) == ["step00000002", "step00000004", "step00000005"]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "step00000004"
    optimizer = next(newest.glob("*optim_states.pt"))
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    extra = {"checkpoint.every": 2, "checkpoint.keep": 3, **QUICK}
    result = launch(tiny_overrides(tiny_shards_of(run_dir), run_dir, **extra), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not resuming from" in result.stderr and "step00000002 at step 2" in result.stderr
    resumed = [r["step"] for r in records(run_dir) if "loss" in r]
    assert resumed[-2:] == [3, 4]
    assert step_dirs(run_dir) == ["step00000002", "step00000004"]  # step 4 saved again, whole
    assert newest_complete(run_dir / "checkpoints") == newest


def test_kill_9_while_a_finished_run_runs_again_leaves_its_checkpoint_usable(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    args = tiny_overrides(tiny_shards_of(run_dir), run_dir, **{"checkpoint.every": 2, **QUICK})
    process = popen(args)
    # Kill it once it is past resuming (it rewrote config.yaml) or while any save it might make is open.
    started = (run_dir / "config.yaml").stat().st_mtime
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        checkpoints = run_dir / "checkpoints"
        if any(checkpoints.glob("*.saving")) or (run_dir / "config.yaml").stat().st_mtime > started:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert newest_complete(run_dir / "checkpoints") == run_dir / "checkpoints" / "step00000004"
    result = launch(args, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 4


def tiny_shards_of(run_dir: Path) -> Path:
    """The shard folder a run directory's config reads (the session's tiny shards)."""
    text = (run_dir / "config.yaml").read_text()
    line = next(line for line in text.splitlines() if "train_shards:" in line)
    return Path(line.split(":", 1)[1].strip().strip("'\"")).parent


class FakeEngine:
    """What Checkpointer asks of a DeepSpeed engine: files under dir/tag, and loading them back."""

    def __init__(self, fail_on_save: Exception | None = None):
        self.fail_on_save, self.loaded = fail_on_save, []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(save_dir, tag)
        folder.mkdir(parents=True)
        torch.save({"step": client_state["step"]}, folder / "mp_rank_00_model_states.pt")
        if self.fail_on_save:
            raise self.fail_on_save

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple:
        torch.load(Path(load_dir, tag, "mp_rank_00_model_states.pt"), weights_only=True)
        self.loaded.append(tag)
        return tag, {}


@pytest.fixture
def one_rank(monkeypatch):
    """The checkpoint module's collectives as one rank sees them, without a process group."""
    monkeypatch.setattr(ckpt, "barrier", lambda: None)
    monkeypatch.setattr(ckpt, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(ckpt, "all_reduce_sum", lambda values, device: values)
    monkeypatch.setattr(ckpt, "use_safe_loading", lambda engine: None)
    return DistInfo(0, 0, 1, torch.device("cpu"))


def test_a_save_at_the_same_step_swaps_in_a_new_folder_and_keep_prunes_only_older(tmp_path, one_rank):
    checkpointer = Checkpointer(CheckpointConfig(keep=2), tmp_path, one_rank)
    for step in (1, 2, 3, 3):
        checkpointer.save(FakeEngine(), step, {"step": step})
    assert step_dirs(tmp_path) == ["step00000002", "step00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000003"
    assert all(problem is None for _, problem in resume_candidates(tmp_path / "checkpoints"))

    # Killed between the swap's two renames: the replaced copy is complete and comes back.
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step00000003").rename(checkpoints / "step00000003.replaced")
    (checkpoints / "step00000003.saving").mkdir()  # and a staging folder left half written
    engine = FakeEngine()
    assert Checkpointer(CheckpointConfig(), tmp_path, one_rank).load(engine)["step"] == 3
    assert engine.loaded == ["step00000003"] and step_dirs(tmp_path) == ["step00000002", "step00000003"]


def test_a_failed_save_removes_its_partial_folder_and_names_a_full_disk(tmp_path, one_rank):
    checkpointer = Checkpointer(CheckpointConfig(), tmp_path, one_rank)
    checkpointer.save(FakeEngine(), 1, {"step": 1})
    full = OSError(28, "No space left on device")
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device.*step00000001"):
        checkpointer.save(FakeEngine(fail_on_save=full), 2, {})
    assert step_dirs(tmp_path) == ["step00000001"]


def test_a_broken_newest_checkpoint_falls_back_and_none_usable_is_an_error(tmp_path, one_rank):
    checkpointer = Checkpointer(CheckpointConfig(), tmp_path, one_rank)
    for step in (1, 2):
        checkpointer.save(FakeEngine(), step, {"step": step})
    newest = tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    newest.write_bytes(b"\x00" * newest.stat().st_size)  # same size, damaged content
    engine = FakeEngine()
    assert Checkpointer(CheckpointConfig(), tmp_path, one_rank).load(engine)["step"] == 1
    assert engine.loaded == ["step00000001"]
    (tmp_path / "checkpoints" / "step00000001" / ckpt.MARKER).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"none can be resumed.*nothing was deleted"):
        Checkpointer(CheckpointConfig(), tmp_path, one_rank).load(FakeEngine())
    assert step_dirs(tmp_path) == ["step00000001", "step00000002"]


def test_a_full_disk_during_a_save_is_named_and_loses_nothing(tiny_shards, tmp_path):
    run_dir = tmp_path / "tmpfs"
    run_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(run_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        extra = {"train.steps": 200, "checkpoint.every": 1, "checkpoint.keep": 1000, **QUICK}
        result = launch(tiny_overrides(tiny_shards, run_dir, **extra), timeout=240)
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "partial checkpoint was removed" in last, last
        assert "Traceback" not in result.stderr
        checkpoints = run_dir / "checkpoints"
        assert not list(checkpoints.glob("*.saving"))
        folders = sorted(p for p in checkpoints.iterdir() if p.is_dir())
        assert len(folders) >= 1 and all(ckpt.checkpoint_problem(p) is None for p in folders)
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)


# -- divergence is noticed -----------------------------------------------------------------------------------


def test_a_diverging_run_stops_without_a_non_finite_checkpoint_and_logs_strict_json(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"optim.lr": 1e4, "train.steps": 40, "checkpoint.every": 1, "checkpoint.keep": 100, **QUICK}
    result = launch(tiny_overrides(tiny_shards, run_dir, **extra), timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "training diverged" in last and "last good checkpoint" in last, last

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line, parse_constant=strict) for line in lines]
    assert any("nonfinite" in record and record.get("loss") is None for record in logged)
    folders = sorted((run_dir / "checkpoints").glob("step*"))
    assert folders
    for folder in folders:
        state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), folder.name


def test_a_bad_step_restores_batch_norm_statistics_and_three_in_a_row_stop(monkeypatch):
    from types import SimpleNamespace

    from trainer import divergence

    monkeypatch.setattr(divergence, "all_reduce_sum", lambda values, device: values)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    applied = [True]
    engine = SimpleNamespace(
        module=module, optimizer=SimpleNamespace(overflow=False), was_step_applied=lambda: applied[0]
    )
    guard = divergence.DivergenceGuard(engine, max_bad_steps=3, device=torch.device("cpu"))
    guard.before_step()
    module(torch.randn(4, 3))
    assert not guard.after_step(1.0, 1, None)  # a good step keeps its statistics
    good = {k: v.clone() for k, v in module.state_dict().items()}
    for step in (2, 3):
        guard.before_step()
        module(torch.full((4, 3), float("nan")))
        assert guard.after_step(float("nan"), step, None)
        assert all(torch.equal(good[k], v) for k, v in module.state_dict().items())
    guard.before_step()
    applied[0] = False  # a finite loss whose gradient norm the optimizer found non-finite
    with pytest.raises(
        divergence.DivergenceError, match=r"3 steps in a row up to step 4.*last good checkpoint: c"
    ):
        guard.after_step(2.0, 4, Path("c"))
    assert not divergence.nonfinite_tensors(module)
    with pytest.raises(ValueError, match="ZeRO stage 0"):
        divergence.DivergenceGuard(SimpleNamespace(optimizer=object()), 3, torch.device("cpu"))
