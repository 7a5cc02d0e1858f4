"""The sbatch templates on a real SLURM cluster: two slurmd nodes on one host (launch/slurm/local_cluster.sh).

Each template runs the trainer as a 2-node x 1-task job; a third job is stopped mid-run with
``scancel --signal=USR1``, checkpoints, requeues itself and resumes at the saved step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, records, tiny_overrides
from trainer.distributed import env_from_slurm, first_host

CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"


def test_srun_task_variables_map_to_torch_distributed():
    task = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_NUM_TASKS": "10", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
            "SLURM_STEP_NODELIST": "gpu[007-009]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    assert env_from_slurm(task) == {
        "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 123456 % 20000),
    }  # fmt: skip
    assert env_from_slurm({**task, "MASTER_ADDR": "10.0.0.7"})["MASTER_ADDR"] == "10.0.0.7"
    batch_script = {k: v for k, v in task.items() if k != "SLURM_STEP_ID"}  # not a task: left alone
    assert env_from_slurm(batch_script) == {} and env_from_slurm({**task, "RANK": "0"}) == {}
    assert first_host("a1,b[2-3]") == "a1" and first_host("node[10,12-14]") == "node10"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment for SLURM clients of a freshly started local cluster."""
    installed = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not (os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("SLURM is not installed, and installing it needs root and apt-get")
    root = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(CLUSTER), "up", str(root)], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, f"local SLURM cluster did not start:\n{up.stdout}\n{up.stderr}"
    env = {
        **os.environ,
        "SLURM_CONF": str(root / "slurm.conf"),
        "DS_ACCELERATOR": "cpu",
        "SIDE4VIDEO_PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    yield env
    subprocess.run([str(CLUSTER), "down", str(root)], capture_output=True, timeout=60)


def submit(env: dict, template: str, args: list[str], logs: Path, wait: bool) -> tuple[str, int]:
    """sbatch a template as a 2-node x 1-task CPU job from the repository root; (job id, sbatch status).

    With ``wait`` the status is the job's exit code."""
    command = [
        "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
        "--cpus-per-task=1", "--time=15", f"--output={logs}/batch.out", *(["--wait"] if wait else []),
        str(REPO / "launch" / "slurm" / template), *args,
    ]  # fmt: skip
    env = {**env, "SIDE4VIDEO_LOG_DIR": str(logs)}
    logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (logs / "sbatch.err").write_text(result.stderr)
    return result.stdout.strip().split(";")[0], result.returncode


def job_state(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def rank_logs(logs: Path) -> dict[int, str]:
    return {int(p.stem[4:]): p.read_text() for p in sorted(logs.glob("rank*.log"))}


def explain(logs: Path) -> str:
    texts = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.*")) if p.is_file()]
    return "\n".join(texts)


@pytest.mark.parametrize("template", ["srun.sbatch", "deepspeed.sbatch"])
def test_template_runs_two_nodes_to_a_checkpoint(slurm, template, tiny_shards, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = tiny_overrides(tiny_shards, run_dir, **{"train.steps": 3})
    job, status = submit(slurm, template, args, logs, wait=True)
    assert status == 0, explain(logs)

    ranks = rank_logs(logs)
    assert sorted(ranks) == [0, 1], explain(logs)
    assert "rank 0 of 2 (local rank 0) on node n1" in ranks[0], explain(logs)
    assert "rank 1 of 2 (local rank 0) on node n2" in ranks[1], explain(logs)
    assert "2 rank(s) on cpu" in ranks[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    assert json.loads((run_dir / "eval.json").read_text())["num_videos"] == 12  # every test clip, once
    if template == "deepspeed.sbatch":
        assert (logs / "hostfile").read_text().split() == ["n1", "slots=1", "n2", "slots=1"]
        assert f"MASTER_PORT={20000 + int(job) % 20000}" in (logs / "deepspeed_env").read_text()


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tiny_shards, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    steps = 150
    args = tiny_overrides(tiny_shards, run_dir, **{"train.steps": steps})
    job, status = submit(slurm, "srun.sbatch", args, logs, wait=False)
    assert status == 0 and job, explain(logs)

    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 3 for r in _records(run_dir)):
        assert time.monotonic() < deadline, explain(logs)
        assert job_state(slurm, job).get("JobState") in ("PENDING", "RUNNING"), explain(logs)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)

    released, seen = False, []
    while (state := job_state(slurm, job)).get("JobState") != "COMPLETED":
        seen.append((state.get("JobState"), state.get("Reason"), state.get("Restarts")))
        assert time.monotonic() < deadline, f"{state}\n{explain(logs)}"
        assert state.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), f"{seen}\n{explain(logs)}"
        if state.get("Reason") == "BeginTime" and not released:
            # slurmctld holds a requeued job back for two minutes before it may start again; skip that. Not
            # within the second of the requeue: slurmd refuses credentials issued in the second it revoked.
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
            released = True
        time.sleep(0.5)
    assert state["Restarts"] == "1", state

    text = rank_logs(logs)[0]  # both runs, appended
    stopped = int(re.search(r"step (\d+): stopped by a signal", text).group(1))
    assert 3 <= stopped < steps
    assert f"at step {stopped}" in text  # "resumed from .../step000000NN at step NN"
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert logged == list(range(1, steps + 1))  # every step once: none lost, none repeated
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    assert (run_dir / "eval.json").is_file()


def _records(run_dir: Path) -> list[dict]:
    try:
        return records(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or a line half-written
        return []
