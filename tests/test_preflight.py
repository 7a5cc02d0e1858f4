"""Checks before work starts: each stream's first shard is opened before step 1, and through the entry point
a bad DeepSpeed key, a bad evaluation spec or a resume with a changed shape is one line and exit code 2."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from data.shards import DataError, check_shard_spec
from tests.conftest import launch, records, tiny_overrides

# -- the shard preflight, in process ---------------------------------------------------------------------


def test_a_good_spec_passes_and_names_its_first_shard(tiny_shards):
    spec = f"{tiny_shards}/test-{{000000..000001}}.tar::{tiny_shards}/train-000000.tar"
    assert check_shard_spec("data.eval_shards", spec) == f"{tiny_shards}/test-000000.tar"


def test_a_compressed_shard_passes(tiny_shards, tmp_path):
    packed = tmp_path / "test-000000.tar.gz"
    packed.write_bytes(gzip.compress((tiny_shards / "test-000000.tar").read_bytes()))
    check_shard_spec("data.eval_shards", str(packed))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing-{0..1}.tar"), r"2 of 2 shards do not exist, e\.g\. '.*missing-0\.tar'"),
        (lambda d: "::", "no shards in '::'"),
        (lambda d: "", "no shards are set"),
        (lambda d: str(d), r" is a directory, not a shard"),
        (lambda d: _file(d / "notes.tar", b"not a tar file at all\n" * 40), r"notes\.tar is not a tar shard"),
        (lambda d: _file(d / "empty.tar", b""), r"empty\.tar is not a tar shard"),
        (lambda d: f"pipe:cat {d}/x.tar", "pipe: URLs run shell commands and are refused"),
    ],
    ids=["missing", "empty-spec", "unset", "directory", "not-a-tar", "empty-file", "pipe"],
)
def test_a_bad_spec_is_one_error_naming_the_key(tmp_path, make, message):
    with pytest.raises(DataError, match=r"^data\.eval_shards: .*" + message) as caught:
        check_shard_spec("data.eval_shards", make(tmp_path))
    assert "\n" not in str(caught.value)


def test_pipe_shards_are_opened_when_allowed(tiny_shards, tmp_path):
    check_shard_spec("data.train_shards", f"pipe:cat {tiny_shards}/train-000000.tar", allow_pipe=True)
    with pytest.raises(DataError, match=r"^data\.train_shards: pipe:echo hello is not a tar shard"):
        check_shard_spec("data.train_shards", "pipe:echo hello", allow_pipe=True)


def test_remote_shards_are_opened_over_http(tiny_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert check_shard_spec("data.eval_shards", f"{base}/test-{{000000..000001}}.tar").startswith(base)
        with pytest.raises(DataError, match=r"^data\.eval_shards: http://.*/missing\.tar cannot be opened"):
            check_shard_spec("data.eval_shards", f"{base}/missing.tar")
    finally:
        server.shutdown()


def _file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# -- through the entry point -------------------------------------------------------------------------------


def _one_error_line(result, prefix: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_misspelled_deepspeed_key_stops_the_run_before_it_starts(tiny_shards, tmp_path):
    ds = json.loads(Path("deepspeed_configs/side_zero2.json").read_text())
    ds["zero_optimisation"] = ds.pop("zero_optimization")
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    extra = {"train.deepspeed_config": tmp_path / "ds.json"}
    result = launch(tiny_overrides(tiny_shards, run_dir, **extra), timeout=120)
    line = _one_error_line(result, "config error:")
    assert line.startswith(
        f'config error: train.deepspeed_config: {tmp_path / "ds.json"}: unknown key "zero_optimisation", '
        "which DeepSpeed "
    )
    assert line.endswith(' would ignore (did you mean "zero_optimization"?)')
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before the model was built


def test_a_bad_eval_spec_is_rejected_before_the_first_step(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"data.eval_shards": tmp_path, "train.steps": 50, "eval.temporal_check": False}
    result = launch(tiny_overrides(tiny_shards, run_dir, **extra), timeout=120)
    line = _one_error_line(result, "data error:")
    assert line.startswith(f"data error: data.eval_shards: {tmp_path} is a directory, not a shard")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_resuming_refuses_a_changed_shape_and_logs_a_changed_batch_size(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    base = {"train.steps": 2, "eval.temporal_check": False}
    first = launch(tiny_overrides(tiny_shards, run_dir, **base), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    before = _digests(checkpoints)
    config = (run_dir / "config.yaml").read_text()

    wider = launch(tiny_overrides(tiny_shards, run_dir, **base, **{"side.width": 48}), timeout=120)
    line = _one_error_line(wider, "config error:")
    assert line.startswith("config error: side.width: 32 -> 48: the checkpoint being resumed (")
    assert "step00000002" in line and line.endswith("set it back, or start a new run_dir")
    assert _digests(checkpoints) == before and (run_dir / "config.yaml").read_text() == config

    smaller = {**base, "train.steps": 3, "data.batch_size": 2}
    resumed = launch(tiny_overrides(tiny_shards, run_dir, **smaller), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = run_dir / "config.until-step00000002.yaml"
    assert (
        "resuming step00000002 with changed settings (old -> new): data.batch_size: 4 -> 2; "
        f"train.steps: 2 -> 3; the previous config is kept as {kept}"
    ) in resumed.stdout
    assert kept.read_text() == config and "batch_size: 2" in (run_dir / "config.yaml").read_text()
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
