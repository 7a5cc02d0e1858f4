"""launch.make_shards: a folder of videos + CSV -> shards; unreadable videos are reported and left out, every
good one is written exactly once under a member name the trainer reads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from data.shards import VIDEO_EXTENSIONS, DataConfig, build_loader
from data.synthetic import encode_mp4, render_clip
from launch.make_shards import main
from tests.conftest import REPO, launch

MOTIONS = ("left", "right", "up", "down")


def clip(seed: int = 0) -> np.ndarray:
    return render_clip(MOTIONS[seed % 4], np.random.default_rng(seed), size=32, frames=8)


def encode(frames: np.ndarray, container: str, codec: str, rate: int = 16) -> bytes:
    """(F, H, W, 3) RGB -> bytes of ``codec`` in ``container`` (a PyAV/ffmpeg format name)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def av1_encoder() -> str | None:
    for name in ("libsvtav1", "libaom-av1", "librav1e"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    return None


def make(tmp_path: Path, videos: dict[str, bytes], csv: str | bytes, *extra: str, out: str = "out") -> int:
    folder = tmp_path / "videos"
    for name, data in videos.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    folder.mkdir(exist_ok=True)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(csv if isinstance(csv, bytes) else csv.encode())
    return main(["--videos", str(folder), "--labels", str(labels), "--out", str(tmp_path / out), *extra])


def read_back(out: Path, prefix: str = "shard") -> dict[str, tuple[str, int]]:
    """{CSV path: (video member, label)} of every sample in ``out``'s shards, after checking that the
    trainer's loader decodes each of them, once, with the same label and nothing skipped."""
    shards = sorted(out.glob(f"{prefix}-*.tar"))
    members: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                key, ext = info.name.split(".", 1)
                assert ext not in members.setdefault(key, {}), f"{info.name} twice"
                members[key][ext] = tar.extractfile(info).read()
    written = {}
    for sample in members.values():
        (video,) = set(sample) - {"cls", "json"}
        assert video in VIDEO_EXTENSIONS and set(sample) == {video, "cls", "json"}
        written[json.loads(sample["json"])["path"]] = (video, int(sample["cls"]))

    cfg = DataConfig(eval_shards="::".join(map(str, shards)), num_frames=4, num_workers=0, eval_batch_size=4)
    decoded, skips = [], {}
    for batch in build_loader(cfg, 32, 8, train=False, seed=0, rank=0, world_size=1):
        assert batch["frames"] is None or batch["frames"].shape[1:] == (1, 4, 3, 32, 32)
        decoded += zip(batch["keys"], batch["labels"].tolist(), strict=True)
        skips = batch["state"]["skips"]
    assert not any(skips.values()), skips
    assert sorted(decoded) == sorted((key, int(sample["cls"])) for key, sample in members.items())
    return written


def test_make_shards_reports_and_leaves_out_bad_videos(tmp_path, capsys):
    videos = {"a.mp4": encode_mp4(clip(0)), "sub/b.v1.mp4": encode_mp4(clip(1)), "c.mp4": encode_mp4(clip(2))}
    videos["broken.mp4"] = b"\x00\x01garbage" * 50
    csv = "path,label\na.mp4,0\nsub/b.v1.mp4,1\nbroken.mp4,2\nmissing.mp4,3\nc.mp4,oops\n"
    assert make(tmp_path, videos, csv) == 0
    out = capsys.readouterr()
    assert "wrote 2 of 5 videos into 1 shards" in out.out
    assert "left out: broken.mp4: not a video container ffmpeg recognises" in out.err
    assert "left out: missing.mp4: no such file under --videos" in out.err
    assert "left out: c.mp4: label 'oops' (line 6) is not a non-negative integer" in out.err

    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert len(names) == 6 and all(n.count(".") == 1 for n in names)  # dots in keys would split samples
    assert meta["frames"] == 8 and meta["height"] == 32
    assert read_back(tmp_path / "out") == {"a.mp4": ("mp4", 0), "sub/b.v1.mp4": ("mp4", 1)}


def test_make_shards_with_nothing_readable_fails(tmp_path):
    assert make(tmp_path, {}, "nothing.mp4,0\n") == 1


def test_m4v_and_mpg_are_stored_under_members_the_trainer_reads(tmp_path, capsys):
    videos = {
        "a.mp4": encode_mp4(clip(0)),
        "b.m4v": encode(clip(1), "ipod", "libx264"),  # what .m4v usually is: an MP4 (Apple's flavour)
        "c.mpg": encode(clip(2), "mpeg", "mpeg1video", rate=25),  # MPEG-1 program stream; 25 fps is legal
        "d.MPEG": encode(clip(3), "vob", "mpeg2video", rate=25),  # MPEG-2 program stream
        "raw.m4v": encode(clip(0), "m4v", "mpeg4"),  # a bare MPEG-4 stream: no container, no frame count
    }
    csv = "a.mp4,0\nb.m4v,1\nc.mpg,2\nd.MPEG,3\nraw.m4v,4\n"
    assert make(tmp_path, videos, csv) == 0
    out = capsys.readouterr()
    assert "wrote 4 of 5 videos" in out.out
    assert "left out: raw.m4v: decord cannot count its frames" in out.err
    assert "note: .mpg videos are stored as .mkv members" in out.err
    assert read_back(tmp_path / "out") == {
        "a.mp4": ("mp4", 0),
        "b.m4v": ("mp4", 1),
        "c.mpg": ("mkv", 2),
        "d.MPEG": ("mkv", 3),
    }


def test_a_path_listed_twice_is_written_once_or_left_out_when_its_labels_conflict(tmp_path, capsys):
    videos = {name: encode_mp4(clip(i)) for i, name in enumerate(["a.mp4", "b.mp4", "c.mp4"])}
    csv = "a.mp4,0\nb.mp4,1\na.mp4,0\nc.mp4,2\n./c.mp4,3\n"
    assert make(tmp_path, videos, csv) == 0
    out = capsys.readouterr()
    assert "wrote 2 of 3 videos" in out.out
    assert "warning: a.mp4 is listed 2 times (lines 1, 3) with label 0; written once" in out.err
    assert "left out: c.mp4: listed with conflicting labels '2' (line 4), '3' (line 5)" in out.err
    assert read_back(tmp_path / "out") == {"a.mp4": ("mp4", 0), "b.mp4": ("mp4", 1)}


@pytest.mark.parametrize("header", ["video,class", "filename,label_id", "path,label", None])
def test_spreadsheet_csv_with_byte_order_mark_and_any_header(tmp_path, capsys, header):
    videos = {"a.mp4": encode_mp4(clip(0)), "b.mp4": encode_mp4(clip(1))}
    rows = ([header] if header else []) + ["a.mp4,0", "b.mp4,1"]
    assert make(tmp_path, videos, "\ufeff" + "\r\n".join(rows) + "\r\n") == 0
    out = capsys.readouterr()
    assert "wrote 2 of 2 videos" in out.out and "left out" not in out.err
    assert ("read as a header" in out.err) == bool(header)
    assert read_back(tmp_path / "out") == {"a.mp4": ("mp4", 0), "b.mp4": ("mp4", 1)}


def test_a_video_with_a_text_label_in_the_first_row_is_reported_not_taken_for_a_header(tmp_path, capsys):
    videos = {"a.mp4": encode_mp4(clip(0)), "b.mp4": encode_mp4(clip(1))}
    assert make(tmp_path, videos, "\ufeffa.mp4,walking\nb.mp4,1\n") == 0
    out = capsys.readouterr()
    assert "wrote 1 of 2 videos" in out.out and "read as a header" not in out.err
    assert "left out: a.mp4: label 'walking' (line 1) is not a non-negative integer" in out.err


def test_out_with_shards_is_refused_unless_overwrite_which_replaces_only_its_prefix(tmp_path, capsys):
    videos = {f"v{i}.mp4": encode_mp4(clip(i)) for i in range(3)}
    csv = "v0.mp4,0\nv1.mp4,1\nv2.mp4,2\n"
    small = ["--shard-size-mb", "0.003"]  # ~3 KB: about one clip per shard
    assert make(tmp_path, videos, csv, *small) == 0
    out_dir = tmp_path / "out"
    first = {path.name: path.read_bytes() for path in out_dir.glob("*.tar")}
    assert len(first) >= 2
    (out_dir / "other.tar").write_bytes(b"not ours")
    capsys.readouterr()

    assert make(tmp_path, videos, "v0.mp4,0\n") == 2  # refused: one line, nothing changed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: --out: ")
    assert "already holds" in err and "--overwrite" in err
    assert {path.name: path.read_bytes() for path in out_dir.glob("shard-*.tar")} == first

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "train-000000.tar").write_bytes(b"")
    assert make(tmp_path, videos, "v0.mp4,0\n", out="elsewhere") == 2  # any .tar refuses, not only ours
    assert make(tmp_path, {}, "gone.mp4,0\n", "--overwrite") == 1  # nothing written: old shards kept
    assert {path.name: path.read_bytes() for path in out_dir.glob("shard-*.tar")} == first

    capsys.readouterr()
    assert make(tmp_path, {"v0.mp4": videos["v0.mp4"]}, "v0.mp4,5\n", "--overwrite") == 0
    assert "wrote 1 of 1 videos into 1 shards" in capsys.readouterr().out
    # the old pack's shards are gone, its manifest replaced; no staging or lock file is left behind
    names = sorted(path.name for path in out_dir.iterdir())
    assert names == ["manifest.json", "other.tar", "shard-000000.tar"]
    assert (out_dir / "other.tar").read_bytes() == b"not ours"
    assert read_back(out_dir) == {"v0.mp4": ("mp4", 5)}


AV1 = av1_encoder()


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("audio", "no video stream (only audio)"),
        pytest.param(
            "av1",
            "AV1 is not supported by decord; re-encode it (e.g. to H.264)",
            marks=pytest.mark.skipif(AV1 is None, reason="this PyAV has no AV1 encoder"),
        ),
    ],
)
def test_decoder_failures_are_worded_for_people(tmp_path, capsys, kind, reason):
    bad = audio_only_mp4() if kind == "audio" else encode(clip(1), "mp4", AV1)
    assert make(tmp_path, {"good.mp4": encode_mp4(clip(0)), "bad.mp4": bad}, "good.mp4,0\nbad.mp4,1\n") == 0
    out = capsys.readouterr()
    assert "wrote 1 of 2 videos" in out.out
    assert f"left out: bad.mp4: {reason}\n" in out.err
    assert "cannot find video stream" not in out.err and ".cc:" not in out.err  # no decord internals
    assert read_back(tmp_path / "out") == {"good.mp4": ("mp4", 0)}


def test_bench_shards_times_each_worker_count_on_the_same_shards(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--clips", "6", "--size", "64x48", "--seconds", "0.5", "--fps", "8", "--workers", "1", "2",
            "--repeats", "1", "--dir", str(tmp_path / "clips"), "--json", str(out)]  # fmt: skip
    result = launch(args, script="launch/bench_shards.py", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["frames"] == 4 and record["shards"] == 1
    assert set(record["wall_s"]) == {"1", "2"} and all(len(runs) == 1 for runs in record["wall_s"].values())
    assert record["speedup"]["1"] == 1.0 and record["speedup"]["2"] > 0
    assert len(list((tmp_path / "clips" / "videos").glob("*.mp4"))) == 6  # kept for the next run


def test_packing_videos_does_not_load_torch(tmp_path):
    """make_shards starts in a fraction of a second and forks light workers: packing videos needs no torch."""
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(encode_mp4(render_clip("left", np.random.default_rng(0), 32, 4)))
    (tmp_path / "labels.csv").write_text("a.mp4,0\n")
    args = [
        "--videos",
        str(tmp_path / "v"),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--out",
        str(tmp_path / "o"),
    ]
    code = (
        f"import sys; from launch.make_shards import main; main({args!r}); sys.exit('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:] or "torch was imported"
    assert "wrote 1 of 1 videos" in result.stdout
