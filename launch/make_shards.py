"""Pack a folder of videos and a CSV of ``path,label`` into WebDataset shards.

python -m launch.make_shards --videos DIR --labels FILE.csv --out DIR [--shard-size-mb 1024] [--prefix shard]

Paths in the CSV are relative to --videos. Every video is opened and its first and last frames decoded
before it is written; one that cannot be read, or has no valid label, is reported and left out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.video import VideoDecodeError, open_video, read_frames
from data.writer import write_shards


def probe(data: bytes) -> dict:
    """Decode the first and last frame; return the video's metadata or raise VideoDecodeError."""
    reader = open_video(data)
    total = len(reader)
    if total == 0:
        raise VideoDecodeError("no frames")
    first = read_frames(reader, np.array([0, total - 1]))
    return {
        "frames": total,
        "height": int(first.shape[1]),
        "width": int(first.shape[2]),
        "fps": float(reader.get_avg_fps()),
    }


def read_labels(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    return [(row[0].strip(), row[1].strip() if len(row) > 1 else "") for row in rows]


def samples(videos: Path, rows: list[tuple[str, str]], rejected: list[str]) -> Iterator[tuple]:
    for index, (relative, label) in enumerate(rows):
        path = videos / relative
        try:
            label_id = int(label)
            if label_id < 0:
                raise ValueError
        except ValueError:
            rejected.append(f"{relative}: label {label!r} is not a non-negative integer")
            continue
        try:
            data = path.read_bytes()
            meta = probe(data)
        except (OSError, VideoDecodeError) as exc:
            rejected.append(f"{relative}: {type(exc).__name__}: {exc}")
            continue
        meta["path"] = relative
        key = f"{index:08d}_{Path(relative).stem}"
        yield key, path.suffix.lstrip(".").lower() or "mp4", data, label_id, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", required=True, type=Path, help="folder the CSV paths are relative to")
    parser.add_argument("--labels", required=True, type=Path, help="CSV of path,label (header optional)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shard-size-mb", type=float, default=1024.0)
    parser.add_argument("--prefix", default="shard")
    args = parser.parse_args(argv)
    if not args.videos.is_dir():
        parser.error(f"--videos: {args.videos} is not a directory")
    if not args.labels.is_file():
        parser.error(f"--labels: {args.labels} does not exist")
    rows = read_labels(args.labels)
    rejected: list[str] = []
    shards = write_shards(
        samples(args.videos, rows, rejected), args.out, args.prefix, max_bytes=int(args.shard_size_mb * 2**20)
    )
    written = len(rows) - len(rejected)
    for line in rejected:
        print(f"left out: {line}", file=sys.stderr)
    print(
        f"wrote {written} of {len(rows)} videos into {len(shards)} shards under {args.out}"
        + (f"; left out {len(rejected)} (listed above)" if rejected else "")
    )
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
