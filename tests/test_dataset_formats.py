"""launch.make_shards --format: each dataset layout -> shards the trainer reads (labels, captions, images),
the entries left out listed in manifest.json with their reasons, classes.txt in index order; packs that
resume after an interruption, run on several processes and re-encode, all giving the same bytes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import packing
from data.captions import parse_captions
from data.images import build_image_loader
from data.shards import DataConfig
from data.synthetic import encode_mp4, render_clip
from data.video import open_video, read_frames
from launch import make_shards
from launch.make_shards import main
from tests.conftest import REPO
from tests.test_make_shards import clip, encode, read_back

BROKEN = b"\x00\x01garbage" * 50


@cache
def mp4(seed: int) -> bytes:
    return encode_mp4(clip(seed))


@cache
def webm(seed: int) -> bytes:
    return encode(clip(seed), "webm", "libvpx-vp9")


def write(root: Path, files: dict[str, bytes | str | object]) -> Path:
    """Files under ``root``: bytes as they are, strings as text, anything else as JSON."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pack(*args: object) -> int:
    return main([str(arg) for arg in args])


def members(out: Path, prefix: str = "shard") -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over ``out``'s shards, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                key, extension = info.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(info).read()
    return samples


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def left_out(out: Path) -> dict[str, str]:
    """{item: kind} of the entries manifest.json lists as left out."""
    return {entry["item"]: entry["kind"] for entry in manifest(out)["rejected"]}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


def test_ssv2_train_and_unlabelled_test(tmp_path, capsys):
    # indices out of name order: classes.txt must follow the indices, not labels.json's order
    labels = {"Putting something on a surface": "0", "Holding something": "2", "Pushing something left": "1"}
    entry = lambda ident, template: {"id": ident, "label": "x", "template": template, "placeholders": ["x"]}
    annotations = write(
        tmp_path / "ssv2",
        {
            "labels.json": labels,
            "train.json": [
                entry("101", "Holding [something]"),
                entry("102", "Pushing [something] left"),
                entry("103", "Putting [something] on a surface"),
                entry("104", "Juggling [something]"),  # not in labels.json
                entry("105", "Holding [something]"),  # never downloaded
                entry("106", "Holding [something]"),  # broken
            ],
            "test.json": [{"id": "201"}, {"id": "202"}],
        },
    )
    videos = write(tmp_path / "videos", {"101.webm": webm(0), "102.webm": webm(1), "103.webm": webm(2)})
    write(videos, {"106.webm": BROKEN, "201.webm": webm(3)})
    ssv2 = ["--format", "ssv2", "--videos", videos, "--annotations", annotations]
    out = tmp_path / "train"
    assert pack(*ssv2, "--split", "train", "--out", out) == 0
    assert "wrote 3 of 6 videos into 1 shards" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().splitlines() == [
        "Putting something on a surface",
        "Pushing something left",
        "Holding something",
    ]
    assert read_back(out) == {"101.webm": ("webm", 2), "102.webm": ("webm", 1), "103.webm": ("webm", 0)}
    assert json.loads(members(out)["101"]["json"])["class"] == "Holding something"
    assert left_out(out) == {"104": "label", "105": "missing", "106": "undecodable"}
    reasons = {entry["item"]: entry["reason"] for entry in manifest(out)["rejected"]}
    assert "'Juggling something' is not in labels.json" in reasons["104"]

    out = tmp_path / "test"
    assert pack(*ssv2, "--split", "test", "--out", out) == 0
    assert set(members(out)) == {"201"} and set(members(out)["201"]) == {"webm", "json"}  # no label
    assert left_out(out) == {"202": "missing"}


def test_kinetics_videos_in_class_folders_or_flat_with_missing_ones_counted(tmp_path, capsys):
    table = tmp_path / "k400.csv"
    table.write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        '"playing guitar",aaa,10,20,train,0\n'
        "abseiling,bbb,0,10,train,0\n"
        "zumba,ccc,5,15,train,0\n"  # never downloaded
        "abseiling,ddd,1,11,train,0\n"  # broken
        '"playing guitar",eee,3,13,val,0\n'
        "knitting,fff,3,13,val,0\n"  # a class the training set does not have
    )
    videos = write(
        tmp_path / "videos",
        {
            "playing guitar/aaa_000010_000020.mp4": mp4(0),
            "bbb_000000_000010.mp4": mp4(1),
            "abseiling/ddd_000001_000011.mp4": BROKEN,
            "val/eee_000003_000013.mp4": mp4(2),
            "val/fff_000003_000013.mp4": mp4(3),
        },
    )
    kinetics = ["--format", "k400", "--videos", videos, "--annotations", table]
    train = tmp_path / "train"
    assert pack(*kinetics, "--split", "train", "--out", train) == 0
    captured = capsys.readouterr()
    assert "wrote 2 of 4 videos" in captured.out and "1 missing, 1 undecodable" in captured.out
    assert "note: 1 of 4 videos are not under --videos" in captured.err
    assert "left out: ccc_000005_000015: no ccc_000005_000015.mp4" in captured.err
    assert (train / "classes.txt").read_text() == "abseiling\nplaying guitar\nzumba\n"  # the sorted labels
    assert read_back(train) == {
        "playing guitar/aaa_000010_000020.mp4": ("mp4", 1),
        "bbb_000000_000010.mp4": ("mp4", 0),
    }
    assert left_out(train) == {"ccc_000005_000015": "missing", "ddd_000001_000011": "undecodable"}

    val = tmp_path / "val"  # the training classes, so that the indices agree
    assert pack(*kinetics, "--split", "val", "--classes", train / "classes.txt", "--out", val) == 0
    assert read_back(val) == {"val/eee_000003_000013.mp4": ("mp4", 1)}
    assert left_out(val) == {"fff_000003_000013": "label"}
    assert (val / "classes.txt").read_text() == (train / "classes.txt").read_text()


def msrvtt_tree(root: Path) -> Path:
    sentences = [
        ("video0", "a man plays guitar"),
        ("video0", "someone plays music"),
        ("video1", "a cat sleeps"),
    ]
    sentences += [("video3", "a car drives"), ("video4", "a person cooks"), ("video4", "food is made")]
    sentences += [("video5", "people dance"), ("video6", "waves crash")]
    splits = ["train", "train", "train", "validate", "test", "test", "train"]
    data = {
        "videos": [
            {"video_id": f"video{i}", "split": split, "category": i} for i, split in enumerate(splits)
        ],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }
    return write(root, {"MSRVTT_data.json": data})


def test_msrvtt_train_9k_list_and_1k_a_test_captions(tmp_path):
    annotations = msrvtt_tree(tmp_path / "msrvtt")
    write(annotations, {"MSRVTT_train.9k.csv": "video_id\nvideo0\nvideo1\nvideo2\nvideo3\nvideo6\n"})
    test_list = "key,vid_key,video_id,sentence\nret0,msr4,video4,a person is cooking\n"
    test_list += "ret1,msr5,video5,a group dances\n"
    write(annotations, {"MSRVTT_JSFUSION_test.csv": test_list})
    # video2 has no caption, video6 no video file, video3 a broken one
    names = {f"video{i}.mp4": mp4(i) for i in (0, 1, 4, 5)}
    videos = write(tmp_path / "videos", {**names, "video2.mp4": mp4(2), "video3.mp4": BROKEN})
    msrvtt = ["--format", "msrvtt", "--videos", videos, "--annotations", annotations]
    out = tmp_path / "train"
    assert pack(*msrvtt, "--split", "train", "--out", out) == 0
    samples = members(out)
    assert set(samples) == {"video0", "video1"} and set(samples["video0"]) == {"mp4", "json"}
    assert parse_captions(samples["video0"]["json"]) == ["a man plays guitar", "someone plays music"]
    assert left_out(out) == {"video2": "caption", "video3": "undecodable", "video6": "missing"}
    assert not (out / "classes.txt").exists()
    decoded = open_video(samples["video1"]["mp4"])
    assert read_frames(decoded, np.arange(8)).shape == (8, 32, 32, 3)

    out = tmp_path / "test"  # 1k-A: the CSV's one caption per video, not the JSON's
    assert pack(*msrvtt, "--split", "test", "--out", out) == 0
    assert {key: parse_captions(s["json"]) for key, s in members(out).items()} == {
        "video4": ["a person is cooking"],
        "video5": ["a group dances"],
    }

    (annotations / "MSRVTT_train.9k.csv").unlink()  # without the list: the JSON's train split
    out = tmp_path / "train7k"
    assert pack(*msrvtt, "--split", "train", "--out", out) == 0
    assert set(members(out)) == {"video0", "video1"}
    assert left_out(out) == {"video2": "caption", "video6": "missing"}


def test_vatex_and_custom_caption_tables(tmp_path, capsys):
    entries = [
        {"videoID": "abc_000001_000011", "enCap": ["a dog runs", " ", "a dog is running"], "chCap": ["x"]},
        {"videoID": "quiet_000000_000010", "enCap": []},
        {"videoID": "gone_000000_000010", "enCap": ["nothing"]},
    ]
    vatex = write(tmp_path, {"vatex.json": entries}) / "vatex.json"
    videos = write(tmp_path / "videos", {"abc_000001_000011.mp4": mp4(0), "quiet_000000_000010.mp4": mp4(1)})
    write(videos, {"a.mp4": mp4(2), "b.mp4": mp4(3), "c.mp4": BROKEN})
    out = tmp_path / "vatex"
    assert pack("--format", "vatex", "--videos", videos, "--annotations", vatex, "--out", out) == 0
    assert parse_captions(members(out)["abc_000001_000011"]["json"]) == ["a dog runs", "a dog is running"]
    assert left_out(out) == {"quiet_000000_000010": "caption", "gone_000000_000010": "missing"}

    table = tmp_path / "captions.csv"  # a caption with unquoted commas is read whole
    table.write_text("path,caption\na.mp4,a red ball\nb.mp4,\na.mp4,a ball, red, rolls\nc.mp4,x\nd.mp4,y\n")
    out = tmp_path / "csv"
    assert pack("--format", "captions-csv", "--videos", videos, "--annotations", table, "--out", out) == 0
    assert "read as a header" in capsys.readouterr().err
    (sample,) = members(out).values()
    assert parse_captions(sample["json"]) == ["a red ball", "a ball, red, rolls"] and "cls" not in sample
    assert left_out(out) == {"b.mp4": "caption", "c.mp4": "undecodable", "d.mp4": "missing"}

    listing = write(tmp_path, {"captions.json": {"a.mp4": ["one", "two"], "b.mp4": "three", "e.mp4": []}})
    out = tmp_path / "json"
    listing = ["--annotations", listing / "captions.json"]
    assert pack("--format", "captions-json", "--videos", videos, *listing, "--out", out) == 0
    captions = {json.loads(s["json"])["path"]: parse_captions(s["json"]) for s in members(out).values()}
    assert captions == {"a.mp4": ["one", "two"], "b.mp4": ["three"]}
    assert left_out(out) == {"e.mp4": "caption"}


def image(seed: int, kind: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def test_imagenet_class_folders_make_image_shards_bevt_reads(tmp_path, capsys):
    jpeg = image(0, "JPEG")
    train = write(
        tmp_path / "train",
        {
            "n02/n02_1.JPEG": image(1, "JPEG"),
            "n02/n02_2.png": image(2, "PNG"),
            "n01/n01_1.JPEG": jpeg,
            "n01/n01_2.JPEG": jpeg[: len(jpeg) // 2],  # truncated
            "n01/n01_3.JPEG": image(3, "PNG"),  # a PNG under a .JPEG name, as ImageNet has
            "n01/README.txt": "not an image",
            "loose.JPEG": jpeg,  # in no class folder
        },
    )
    out = tmp_path / "out"
    assert pack("--format", "imagenet", "--images", train, "--out", out, "--shard-size", 2) == 0
    captured = capsys.readouterr()
    assert "wrote 4 of 5 images into 2 shards" in captured.out
    assert (
        "1 files directly in" in captured.err
        and "1 files in the class folders are not images" in captured.err
    )
    assert (out / "classes.txt").read_text() == "n01\nn02\n"
    samples = members(out)
    assert {key: set(s) for key, s in samples.items()} == {
        "n01_n01_1": {"jpg", "cls", "json"},
        "n01_n01_3": {"png", "cls", "json"},  # stored under the member its bytes are
        "n02_n02_1": {"jpg", "cls", "json"},
        "n02_n02_2": {"png", "cls", "json"},
    }
    assert left_out(out) == {"n01/n01_2.JPEG": "undecodable"}

    cfg = DataConfig(num_workers=0, eval_batch_size=8)
    loader = build_image_loader(
        cfg, str(out / "shard-{000000..000001}.tar"), 8, 16, False, 0, 0, 1, num_classes=2
    )
    (batch,) = list(loader)
    assert batch["frames"].shape == (4, 3, 16, 16)
    labels = dict(zip(batch["keys"], batch["labels"].tolist(), strict=True))
    assert labels == {"n01_n01_1": 0, "n01_n01_3": 0, "n02_n02_1": 1, "n02_n02_2": 1}


def csv_tree(root: Path, count: int) -> tuple[Path, Path]:
    """``count`` good clips with a broken one and a missing one among them."""
    names = {f"v{i:02d}.mp4": mp4(i) for i in range(count)}
    videos = write(root / "videos", {**names, "broken.mp4": BROKEN})
    rows = [f"v{i:02d}.mp4,{i % 4}" for i in range(count)]
    rows[count // 2 : count // 2] = ["broken.mp4,1", "missing.mp4,2"]
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return videos, labels


def test_an_interrupted_pack_resumes_into_the_same_bytes(tmp_path, capsys, monkeypatch):
    videos, labels = csv_tree(tmp_path, 7)
    command = lambda out, *extra: pack(
        "--videos", videos, "--labels", labels, "--out", out, "--shard-size", 2, *extra
    )
    assert command(tmp_path / "whole") == 0
    whole = shard_bytes(tmp_path / "whole")
    assert len(whole) == 4

    commit = make_shards.Pack.commit

    def interrupted_commit(self, *args):  # Ctrl-C right after the second shard is recorded
        record = commit(self, *args)
        if len(self.shards) == 2:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(make_shards.Pack, "commit", interrupted_commit)
    out = tmp_path / "out"
    capsys.readouterr()
    assert command(out) == 130
    assert "interrupted: 2 finished shards (4 videos) are kept" in capsys.readouterr().err
    assert manifest(out)["status"] == "running" and len(manifest(out)["shards"]) == 2
    assert sorted(path.name for path in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    monkeypatch.undo()

    # a different command is refused, naming what differs; the finished shards stay
    assert command(out, "--shard-size-mb", 5) == 2
    err = capsys.readouterr().err
    assert "an unfinished pack of another command: --shard-size-mb 1024.0 before, 5.0 now" in err

    assert command(out) == 0
    captured = capsys.readouterr()
    assert "note: resuming: keeping 2 finished shards (4 videos)" in captured.err
    assert captured.err.count(".tar: ") == 2  # only the last two shards were written
    assert (
        "wrote 7 of 9 videos into 4 shards" in captured.out and "(2 kept from an earlier run)" in captured.out
    )
    assert f"shards: {out}/shard-{{000000..000003}}.tar" in captured.out  # for data.train_shards
    assert shard_bytes(out) == whole
    assert manifest(out)["shards"] == manifest(tmp_path / "whole")["shards"]
    assert manifest(out)["status"] == "complete"
    assert left_out(out) == {"broken.mp4": "undecodable", "missing.mp4": "missing"}

    assert command(out) == 0  # the finished pack again: nothing to do
    assert "all there; nothing left to write" in capsys.readouterr().err
    labels.write_text(labels.read_text().replace("v00.mp4,0", "v00.mp4,3"))
    assert command(out) == 2
    assert "labels.csv changed" in capsys.readouterr().err
    assert command(out, "--overwrite") == 0  # a fresh pack
    assert "resuming" not in capsys.readouterr().err and read_back(out)["v00.mp4"] == ("mp4", 3)


def test_a_killed_pack_resumes_into_the_same_bytes(tmp_path):
    videos, labels = csv_tree(tmp_path, 40)
    args = ["--videos", videos, "--labels", labels, "--shard-size", 2, "--short-side", 20]
    assert pack(*args, "--out", tmp_path / "whole") == 0
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.make_shards", *map(str, args), "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "manifest.json").exists() and len(manifest(out)["shards"]) >= 2:
            process.send_signal(signal.SIGKILL)  # no clean-up at all, whenever it happens to be
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the pack finished before it could be killed"
    assert manifest(out)["status"] == "running"
    assert pack(*args, "--out", out) == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert sorted(path.name for path in out.iterdir() if not path.name.endswith(".tar")) == ["manifest.json"]


@pytest.mark.parametrize(
    "reencode, method",
    [([], None), (["--short-side", 20], None), ([], "forkserver")],
    ids=["as-is", "short-side", "forkserver"],
)
def test_two_workers_write_the_same_shards_as_one(tmp_path, monkeypatch, reencode, method):
    monkeypatch.setattr(packing, "START_METHOD", method)  # None: fork here, where it is safe
    videos, labels = csv_tree(tmp_path, 9)
    outs = {workers: tmp_path / f"workers{workers}" for workers in (1, 2)}
    for workers, out in outs.items():
        args = ["--videos", videos, "--labels", labels, "--out", out, "--shard-size", 3, "--workers", workers]
        assert pack(*args, *reencode) == 0
    assert len(shard_bytes(outs[1])) == 3 and shard_bytes(outs[1]) == shard_bytes(outs[2])
    assert left_out(outs[2]) == {"broken.mp4": "undecodable", "missing.mp4": "missing"}


def test_short_side_and_max_seconds_reencode_to_what_the_trainer_decodes(tmp_path):
    long = render_clip("left", np.random.default_rng(0), size=64, frames=24)[:, 8:56]  # (24, 48, 64, 3)
    short = long[:8]
    videos = write(
        tmp_path / "videos",
        {"long.mp4": encode_mp4(long, fps=8), "short.mkv": encode(short, "matroska", "libx264", rate=8)},
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("long.mp4,0\nshort.mkv,1\n")

    def packed(*extra) -> dict[str, tuple[str, tuple, int, float]]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert pack("--videos", videos, "--labels", labels, "--out", out, *extra) == 0
        shapes = {}
        for sample in members(out).values():
            meta = json.loads(sample["json"])
            (extension,) = set(sample) - {"cls", "json"}
            reader = open_video(sample[extension])  # the trainer's decoder
            frames = read_frames(reader, np.arange(len(reader)))
            assert (meta["frames"], meta["height"], meta["width"]) == frames.shape[:3]
            shapes[meta["path"]] = (extension, frames.shape[:3], reader.get_avg_fps())
        return shapes

    assert packed("--short-side", 32) == {
        "long.mp4": ("mp4", (24, 32, 42), 8.0),
        "short.mkv": ("mp4", (8, 32, 42), 8.0),
    }
    trimmed = packed("--short-side", 32, "--max-seconds", 2)
    assert trimmed["long.mp4"] == ("mp4", (16, 32, 42), 8.0)
    # trimming alone re-encodes only what is too long; a short video keeps its bytes and container
    assert packed("--max-seconds", 2) == {
        "long.mp4": ("mp4", (16, 48, 64), 8.0),
        "short.mkv": ("mkv", (8, 48, 64), 8.0),
    }
    assert packed("--short-side", 64) == {
        "long.mp4": ("mp4", (24, 48, 64), 8.0),
        "short.mkv": ("mp4", (8, 48, 64), 8.0),
    }  # never enlarged


def test_reencoding_gives_the_same_bytes_every_time():
    # sides that are no multiple of 16 are where x264's AVX-512 code made the bytes vary (x264_options)
    sources = [mp4(seed) for seed in range(24)]
    for side in (26, 30):
        for data in sources:
            assert len({packing.transcode(data, side, None, 23)[0] for _ in range(4)}) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "ssv2", "--annotations", "."], "--format ssv2 needs --split train|validation|test"),
        (
            ["--format", "vatex", "--annotations", "x.json", "--split", "train"],
            "--format vatex has no splits",
        ),
        (["--format", "vatex", "--labels", "x.csv"], "--labels is the csv format's"),
        (["--format", "msrvtt", "--annotations", ".", "--split", "dev"], "--split: 'dev' is not one of"),
        (["--format", "imagenet", "--short-side", "128"], "--short-side and --max-seconds re-encode videos"),
        (["--labels", "x.csv", "--short-side", "225"], "--short-side: 225 must be even"),
        (
            ["--format", "ssv2", "--annotations", ".", "--split", "train", "--classes", "c.txt"],
            "leave out --classes",
        ),
        (["--format", "kinetics"], "--format kinetics needs --annotations FILE"),
        (["--format", "ssv2", "--annotations", ".", "--split", "train"], "holds no labels file"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("a.mp4,0\n")
    (tmp_path / "x.json").write_text("[]")
    assert main(["--videos", ".", "--out", "out", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
