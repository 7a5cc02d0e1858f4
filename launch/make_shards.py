"""Pack a folder of videos and a CSV of ``path,label`` into WebDataset shards.

python -m launch.make_shards --videos DIR --labels FILE.csv --out DIR [--prefix shard] [--shard-size-mb 1024]
                             [--overwrite]

The CSV: one ``path,label`` row per video, paths relative to --videos, labels non-negative integers. A header
row is recognised under any names (``path,label``, ``video,class``, ...), a spreadsheet's UTF-8 byte-order
mark is ignored, and lines starting with ``#`` are comments. A path listed twice with the same label is
written once (with a warning); listed with different labels it is left out.

Every video is opened and its first and last frames decoded, exactly as the trainer decodes them, before it
is written; one that cannot be read, or has no valid label, is left out and named on stderr with the reason
(``left out: PATH: why``). The bytes are stored unchanged under a member name the trainer reads
(``data.shards.VIDEO_EXTENSIONS``): the file's own suffix where it is one, ``mp4`` for .m4v/.3gp/.3g2, ``mov``
for .qt and ``mkv`` for any other (.mpg, .mpeg, ...); decord tells the container from the bytes, not the name.

--out must hold no .tar files, unless --overwrite is given: then the shards named PREFIX-NNNNNN.tar there are
replaced (other files are kept). New shards are written to a temporary folder inside --out and moved in only
once at least one video was written, so a run that writes nothing leaves the old shards as they were.

Exit status: 0 when at least one video was written, 1 when none was, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.shards import VIDEO_EXTENSIONS
from data.video import VideoDecodeError, open_video, read_frames
from data.writer import write_shards

# Suffixes of one container family the trainer knows under another name: .m4v/.3gp/.3g2 are ISO media files.
MEMBER_ALIASES = {"m4v": "mp4", "3gp": "mp4", "3g2": "mp4", "qt": "mov"}
FALLBACK_MEMBER = "mkv"  # the generic name for any other container; decord sniffs the real one
# Suffixes that mark a CSV cell as a video path rather than a column name (header detection only).
VIDEO_SUFFIXES = {*VIDEO_EXTENSIONS, *MEMBER_ALIASES, "mpg", "mpeg", "m2v", "ts", "m2ts", "mts", "vob", "flv",
                  "wmv", "asf", "ogv", "ogg", "mxf", "y4m", "ivf", "dv", "f4v"}  # fmt: skip


class UsageError(Exception):
    """A problem with the command line or its inputs: one line to the user, exit status 2."""


@dataclass
class Row:
    line: int  # line in the CSV, for messages
    path: str
    label: str


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


def member_extension(path: str) -> str:
    """The tar member extension for a video: one of VIDEO_EXTENSIONS, the only members the trainer reads."""
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix in VIDEO_EXTENSIONS:
        return suffix
    return MEMBER_ALIASES.get(suffix, FALLBACK_MEMBER)


def parse_label(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def read_labels(path: Path, videos: Path) -> tuple[list[Row], Row | None]:
    """The CSV's data rows and its header row (None without one)."""
    try:
        # utf-8-sig drops the byte-order mark spreadsheets write, which would otherwise join the first cell
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows = [
                Row(reader.line_num, cells[0].strip(), cells[1].strip() if len(cells) > 1 else "")
                for cells in reader
                if any(cell.strip() for cell in cells) and not cells[0].lstrip().startswith("#")
            ]
    except UnicodeDecodeError as exc:
        raise UsageError(f"--labels: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise UsageError(f"--labels: {path} is not a readable CSV: {exc}") from exc
    if rows and is_header(rows[0], videos):
        return rows[1:], rows[0]
    return rows, None


def is_header(row: Row, videos: Path) -> bool:
    """A first row is a header when its label is no integer and its path cell names no video: not a file
    there, and no video suffix (a video with a bad label stays a data row, reported as such)."""
    if parse_label(row.label) is not None or not row.path:
        return False
    suffix = Path(row.path).suffix.lstrip(".").lower()
    return not (videos / row.path).is_file() and suffix not in VIDEO_SUFFIXES


def group_rows(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows by normalised path ("./a.mp4" and "a.mp4" are one video), in first-listed order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(os.path.normpath(row.path) if row.path else "", []).append(row)
    return groups


def lines(rows: list[Row]) -> str:
    return ", ".join(str(row.line) for row in rows)


def choose_label(path: str, rows: list[Row], left_out: list[str], warnings: list[str]) -> int | None:
    """The one label of a video listed in ``rows``, or None (reason added to ``left_out``)."""
    # "3" and "03" are one label; text labels are compared as written
    values = {label if (label := parse_label(row.label)) is not None else row.label for row in rows}
    if len(values) > 1:
        listed = ", ".join(f"{row.label!r} (line {row.line})" for row in rows)
        left_out.append(f"{path}: listed with conflicting labels {listed}; fix the CSV to keep it")
        return None
    label = parse_label(rows[0].label)
    if label is None:
        left_out.append(f"{path}: label {rows[0].label!r} (line {lines(rows)}) is not a non-negative integer")
        return None
    if len(rows) > 1:
        times = f"{len(rows)} times (lines {lines(rows)})"
        warnings.append(f"{path} is listed {times} with label {label}; written once")
    return label


def read_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file under --videos"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a video file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot be read: {exc.strerror or exc}"


def samples(
    videos: Path, groups: dict[str, list[Row]], left_out: list[str], warnings: list[str], written: list[str]
) -> Iterator[tuple]:
    """(key, member extension, bytes, label, metadata) for every video that has one label and decodes."""
    for index, (relative, rows) in enumerate(groups.items()):
        if not relative:
            left_out.append(f"line {lines(rows)}: no path")
            continue
        label = choose_label(relative, rows, left_out, warnings)
        if label is None:
            continue
        try:
            data = (videos / relative).read_bytes()
            meta = probe(data)
        except OSError as exc:
            left_out.append(f"{relative}: {read_error(exc)}")
            continue
        except VideoDecodeError as exc:
            left_out.append(f"{relative}: {exc}")
            continue
        meta["path"] = relative
        written.append(relative)
        yield f"{index:08d}_{Path(relative).stem}", member_extension(relative), data, label, meta


def own_shards(out: Path, prefix: str) -> list[Path]:
    """The shards this tool writes under ``prefix``: PREFIX-NNNNNN.tar, the only files --overwrite removes."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    return sorted(path for path in out.glob("*.tar") if pattern.fullmatch(path.name) and path.is_file())


def check_out(out: Path, prefix: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    tars = sorted(out.glob("*.tar")) if out.is_dir() else []
    if tars and not overwrite:
        names = ", ".join(path.name for path in tars[:3]) + (", ..." if len(tars) > 3 else "")
        files = f"{len(tars)} .tar file{'s' * (len(tars) > 1)}"
        raise UsageError(
            f"--out: {out} already holds {files} ({names}); pass --overwrite to replace the "
            f"shards named {prefix}-NNNNNN.tar there, or choose an empty --out"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", required=True, type=Path, help="folder the CSV paths are relative to")
    parser.add_argument("--labels", required=True, type=Path, help="CSV of path,label (header optional)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards; must hold no .tar")
    parser.add_argument("--shard-size-mb", type=float, default=1024.0)
    parser.add_argument("--prefix", default="shard", help="shards are named PREFIX-000000.tar, ...")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the PREFIX-NNNNNN.tar shards already in --out"
    )
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if not args.videos.is_dir():
        raise UsageError(f"--videos: {args.videos} is not a directory")
    if not args.labels.is_file():
        raise UsageError(f"--labels: {args.labels} does not exist")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        raise UsageError(f"--prefix: {args.prefix!r} must be a non-empty file name prefix")
    check_out(args.out, args.prefix, args.overwrite)
    rows, header = read_labels(args.labels, args.videos)
    if header:
        print(f"note: line {header.line} {header.path!r},{header.label!r} read as a header", file=sys.stderr)
    groups = group_rows(rows)

    left_out: list[str] = []
    warnings: list[str] = []
    written: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.prefix}-staging-", dir=args.out))
    try:
        staged = write_shards(
            samples(args.videos, groups, left_out, warnings, written),
            staging,
            args.prefix,
            max_bytes=int(args.shard_size_mb * 2**20),
        )
        shards: list[Path] = []
        if written:  # only now replace the old shards: a run that writes nothing keeps them
            for old in own_shards(args.out, args.prefix):
                old.unlink()
            for shard in staged:
                shards.append(shard.replace(args.out / shard.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    renamed = sorted(
        {(Path(path).suffix.lower(), member_extension(path)) for path in written}
        - {(f".{ext}", ext) for ext in VIDEO_EXTENSIONS}
    )
    for suffix, member in renamed:
        print(
            f"note: {suffix or 'suffix-less'} videos are stored as .{member} members (the trainer reads only "
            f"{', '.join(VIDEO_EXTENSIONS)}; the bytes are unchanged)",
            file=sys.stderr,
        )
    for line in left_out:
        print(f"left out: {line}", file=sys.stderr)
    print(
        f"wrote {len(written)} of {len(groups)} videos into {len(shards)} shards under {args.out}"
        + (f"; left out {len(left_out)} (listed above)" if left_out else "")
    )
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
