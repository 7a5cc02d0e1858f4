"""launch.make_shards: a folder of videos + CSV -> shards; unreadable videos are reported and left out."""

from __future__ import annotations

import json
import tarfile

import numpy as np

from data.shards import DataConfig, build_loader
from data.synthetic import encode_mp4, render_clip
from launch.make_shards import main


def test_make_shards_reports_and_leaves_out_bad_videos(tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, motion in [("a.mp4", "left"), ("sub/b.v1.mp4", "right"), ("c.mp4", "up")]:
        (videos / name).write_bytes(encode_mp4(render_clip(motion, rng, size=32, frames=8)))
    (videos / "broken.mp4").write_bytes(b"\x00\x01garbage" * 50)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.mp4,0\nsub/b.v1.mp4,1\nbroken.mp4,2\nmissing.mp4,3\nc.mp4,oops\n")

    assert main(["--videos", str(videos), "--labels", str(labels), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "wrote 2 of 5 videos into 1 shards" in out.out
    for name in ("broken.mp4", "missing.mp4", "c.mp4"):
        assert f"left out: {name}" in out.err

    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert len(names) == 6 and all(n.count(".") == 1 for n in names)  # dots in keys would split samples
    assert meta["frames"] == 8 and meta["height"] == 32

    cfg = DataConfig(eval_shards=str(tmp_path / "out" / "shard-000000.tar"), num_frames=4, num_workers=0)
    batches = list(build_loader(cfg, 32, 2, train=False, seed=0, rank=0, world_size=1))
    assert sorted(batches[0]["labels"].tolist()) == [0, 1]


def test_make_shards_with_nothing_readable_fails(tmp_path):
    (tmp_path / "v").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("nothing.mp4,0\n")
    assert (
        main(["--videos", str(tmp_path / "v"), "--labels", str(labels), "--out", str(tmp_path / "out")]) == 1
    )
