"""Evaluating, predicting and extracting features from a trained run through the entry points (real processes,
one and two ranks), all from one tiny run trained once (``tiny_run``)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import launch
from trainer.checkpoint import newest_complete, read_module_state
from trainer.evaluate import class_names, plot_confusion

TEST_VIDEOS = 12


def run(entry: str, args: list[str], ranks: int = 1, timeout: int = 240):
    return launch(args, timeout=timeout, ranks=ranks, script=f"launch/{entry}.py")


def predictions(out: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len({r["key"] for r in records})
    return {r["key"]: r for r in records}


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory) -> Path:
    """launch.evaluate of the run's newest checkpoint on one process, into its own folder."""
    out = tmp_path_factory.mktemp("evaluated")
    result = run("evaluate", [*tiny_run.overrides, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written to" in result.stdout
    return out


def test_evaluate_gives_the_runs_final_evaluation_with_per_class_accuracy(tiny_run, evaluated):
    trained = json.loads((tiny_run.run_dir / "eval.json").read_text())
    evaluation = json.loads((evaluated / "eval.json").read_text())
    assert evaluation["step"] == trained["step"] == 4 and evaluation["views"] == 2
    assert evaluation["weights"] == str(tiny_run.run_dir / "checkpoints" / "step00000004")
    for key in ("top1", "top5", "mean_class_acc", "num_videos", "top1_frame_shuffled", "top1_single_frame"):
        assert evaluation[key] == trained[key], key
    per_class = evaluation["per_class"]
    assert [c["name"] for c in per_class] == tiny_run.classes  # 12 videos: every class has one or two
    assert sum(c["videos"] for c in per_class) == TEST_VIDEOS
    assert np.mean([c["top1"] for c in per_class]) == pytest.approx(evaluation["mean_class_acc"])

    records = predictions(evaluated)
    assert len(records) == TEST_VIDEOS
    top1 = np.mean([r["top5"][0] == r["label"] for r in records.values()])
    assert top1 == pytest.approx(evaluation["top1"])
    assert all(
        len(r["top5"]) == 5 and r["top5_probs"] == sorted(r["top5_probs"], reverse=True)
        for r in records.values()
    )
    confusion = np.load(evaluated / "confusion.npy")
    assert confusion.shape == (8, 8) and confusion.sum() == TEST_VIDEOS
    assert np.trace(confusion) / TEST_VIDEOS == pytest.approx(evaluation["top1"])
    assert (evaluated / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_ranks_write_the_same_predictions_as_one(tiny_run, evaluated, tmp_path):
    result = run("evaluate", [*tiny_run.overrides, "--out", str(tmp_path)], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = predictions(evaluated), predictions(tmp_path)
    assert {(k, r["label"], tuple(r["top5"])) for k, r in one.items()} == {
        (k, r["label"], tuple(r["top5"])) for k, r in two.items()
    }
    for key, record in one.items():
        assert np.allclose(record["top5_probs"], two[key]["top5_probs"], atol=1e-5)
    assert (
        json.loads((tmp_path / "eval.json").read_text())["top1"]
        == json.loads((evaluated / "eval.json").read_text())["top1"]
    )


def test_predict_names_the_classes_of_a_clip_and_reports_a_broken_file(tiny_run, evaluated, tmp_path):
    with tarfile.open(tiny_run.eval_shards / "test-000000.tar") as shard:
        clip = tmp_path / "test000003.mp4"
        clip.write_bytes(shard.extractfile("test000003.mp4").read())
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    result = run("predict", [*tiny_run.overrides, "--json", str(clip), str(broken)])
    assert result.returncode == 2, result.stderr[-3000:]  # one file failed; the other was predicted
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(clip), str(broken)]
    expected = predictions(evaluated)["test000003"]  # decoded exactly as the evaluation decodes it
    top5 = lines[0]["top5"]
    assert [entry["class"] for entry in top5] == expected["top5"]
    assert [entry["name"] for entry in top5] == [tiny_run.classes[c] for c in expected["top5"]]
    assert np.allclose([entry["prob"] for entry in top5], expected["top5_probs"], atol=1e-5)
    assert "error" in lines[1] and "top5" not in lines[1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {broken}: {lines[1]['error']}"]


def features(out: Path) -> tuple[dict, dict[str, dict[str, bytes]]]:
    index = json.loads((out / "index.json").read_text())
    members: dict[str, dict[str, bytes]] = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return index, members


def test_extract_features_on_two_ranks_writes_every_video_once_as_one_rank_does(tiny_run, tmp_path):
    common = [*tiny_run.overrides, "--shards", str(tiny_run.eval_shards / "test-{000000..000001}.tar")]
    result = run("extract_features", [*common, "--frozen", "--out", str(tmp_path / "two")], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("extract_features", [*common, "--frozen", "--out", str(tmp_path / "one")])
    assert result.returncode == 0, result.stderr[-3000:]
    index, two = features(tmp_path / "two")
    _, one = features(tmp_path / "one")
    keys = [key for shard in index["shards"] for key in shard["keys"]]
    assert len(index["shards"]) == 2 and len(keys) == len(set(keys)) == index["num_videos"] == TEST_VIDEOS
    assert sorted(two) == sorted(one) == sorted(keys) and index["skipped"] == 0
    assert index["shapes"] == {"npy": [32], "frozen.npy": [2, 4, 32]}  # side width; views, frames, backbone
    for key, members in one.items():
        assert set(members) == {"npy", "frozen.npy", "cls"} and members["cls"] == two[key]["cls"]
        for name in ("npy", "frozen.npy"):
            a, b = np.load(io.BytesIO(members[name])), np.load(io.BytesIO(two[key][name]))
            assert a.dtype == np.float32 and list(a.shape) == index["shapes"][name]
            assert np.allclose(a, b, atol=1e-6), (key, name)


def test_evaluate_an_imported_release_without_any_checkpoint(tiny_run, evaluated, tmp_path):
    """side.init_from stands in for a checkpoint: the run's trained side network written as a release
    evaluates as the checkpoint does."""
    from safetensors.torch import save_file

    checkpoint = newest_complete(tiny_run.run_dir / "checkpoints")
    state = read_module_state(str(checkpoint), "test")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "side.safetensors")
    empty = tmp_path / "fresh"
    args = [
        *tiny_run.overrides,
        f"run_dir={empty}",
        f"side.init_from={tmp_path}",
        "eval.temporal_check=false",
    ]
    result = run("evaluate", args)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((empty / "evaluation" / "eval.json").read_text())  # the default --out
    assert evaluation["weights"] == str(tmp_path) and evaluation["step"] is None
    assert evaluation["top1"] == json.loads((evaluated / "eval.json").read_text())["top1"]
    # Two ways of loading the same weights.
    released, checkpointed = predictions(empty / "evaluation"), predictions(evaluated)
    assert released.keys() == checkpointed.keys()
    for key, record in released.items():
        assert record["top5"] == checkpointed[key]["top5"]
        assert np.allclose(record["top5_probs"], checkpointed[key]["top5_probs"], atol=1e-6)
    assert not (empty / "checkpoints").exists()


def test_no_checkpoint_is_one_line_naming_the_run_directory(tiny_shards, tmp_path, capsys):
    from tests.conftest import tiny_overrides
    from trainer.config import load_config
    from trainer.evaluator import find_checkpoint
    from trainer.failures import report

    cfg = load_config(None, tiny_overrides(tiny_shards, tmp_path / "x"))
    with pytest.raises(Exception) as error:
        find_checkpoint(cfg, None)
    assert report(error.value) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'x'} holds no complete checkpoint; train first or pass --checkpoint\n"
    )
    half = tmp_path / "run" / "checkpoints" / "step00000002"
    half.mkdir(parents=True)
    torch.save({"module": {}}, half / "mp_rank_00_model_states.pt")  # a save that never got its marker
    with pytest.raises(Exception, match="step00000002 is not a complete checkpoint: no completion marker"):
        find_checkpoint(cfg, str(half))
    with pytest.raises(Exception, match="holds no complete checkpoint"):
        find_checkpoint(cfg, str(tmp_path / "run"))


def test_class_names_must_name_every_class(tmp_path):
    (tmp_path / "test-000000.tar").write_bytes(b"")
    spec = str(tmp_path / "test-000000.tar")
    assert class_names(spec, 3) is None  # no classes.txt: indices stand in
    (tmp_path / "classes.txt").write_text("a\nb b\nc\n\n")
    assert class_names(spec, 3) == ["a", "b b", "c"]
    with pytest.raises(Exception, match="3 class names for 4 classes"):
        class_names(spec, 4)
    with pytest.raises(Exception, match="does not exist"):
        class_names(spec, 3, str(tmp_path / "other.txt"))


def test_caption_ranks_are_the_text_to_video_ranks(tmp_path):
    from trainer.retrieval import RetrievalScores, retrieval_metrics

    sim = np.array(
        [[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.6, 0.1], [0.0, 0.1, 0.7]]
    )  # 4 captions, 3 videos
    text_video = np.array([0, 0, 1, 2])
    videos = ["a", "b", "c"]
    scores = RetrievalScores(
        videos, [("a", 0), ("a", 1), ("b", 0), ("c", 0)], sim, text_video, {"skipped": 0}
    )
    scores.write(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "caption_ranks.jsonl").read_text().splitlines()]
    assert [(r["key"], r["caption"], r["rank"]) for r in records] == [
        ("a", 0, 1),
        ("a", 1, 3),
        ("b", 0, 1),
        ("c", 0, 1),
    ]
    assert records[1]["top5"] == ["c", "b", "a"]
    assert np.mean([r["rank"] == 1 for r in records]) == retrieval_metrics(sim, text_video)["t2v_r1"]
    assert scores.metrics()["num_captions"] == 4


def test_confusion_plot_at_400_classes(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.poisson(0.05, (400, 400)) + np.diag(rng.integers(0, 20, 400))
    plot_confusion(confusion, [f"class with a long name {i}" for i in range(400)], tmp_path / "c.png")
    from matplotlib.image import imread

    image = imread(tmp_path / "c.png")
    assert image.shape[:2] == (1000, 2000)
