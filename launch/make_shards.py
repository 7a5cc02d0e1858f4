"""Pack a dataset (videos or images + its annotations) into WebDataset tar shards the trainer reads.

python -m launch.make_shards --videos DIR --labels FILE.csv --out DIR          # the default: --format csv
python -m launch.make_shards --format NAME --videos DIR [--annotations PATH] [--split NAME] --out DIR
    [--classes classes.txt] [--prefix shard] [--shard-size-mb 1024] [--shard-size N] [--workers N]
    [--short-side S] [--max-seconds T] [--crf 23] [--overwrite]

Formats (readers in data/formats.py; PATH is the format's annotation file or folder):
  csv            --labels FILE.csv: ``path,label`` rows, integer labels (the original format, below)
  ssv2           PATH = the folder of labels.json, train.json, validation.json, test.json (test: unlabelled);
                 --split train|validation|test; videos <id>.webm
  kinetics       (k400, k600, k700) PATH = the CSV label,youtube_id,time_start,time_end,split[,is_cc];
                 videos <youtube_id>_<start:06d>_<end:06d>.mp4 anywhere under --videos; classes = the sorted
                 labels (or --classes); videos never downloaded are left out and counted
  msrvtt         PATH = the folder of MSRVTT_data.json [+ MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv];
                 --split train|validation|test (train = the 9k list when present, test = the 1k-A list)
  vatex          PATH = the JSON list of {"videoID", "enCap"}; videos <videoID>.mp4
  imagenet       --videos (or --images) = the split folder of class folders; image shards for BEVT
  captions-csv   PATH = a ``path,caption`` table (several rows of a path = several captions)
  captions-json  PATH = {"path": ["caption", ...]} or [{"path", "caption"|"captions"}]
Recognition samples are KEY.<video> + KEY.cls + KEY.json (the probe's metadata, the source path, ids);
retrieval samples carry their captions in KEY.json (``{"captions": [...]}``) and no KEY.cls; unlabelled ones
(ssv2 test) have no KEY.cls. --out also gets classes.txt (index -> name, one a line) where the format has
classes, and manifest.json: every shard with its samples, bytes and sha256, every entry left out with the
reason, the command and its inputs.

The csv format: one ``path,label`` row per video, paths relative to --videos, labels non-negative integers. A
header row is recognised under any names (``path,label``, ``video,class``, ...), a spreadsheet's UTF-8
byte-order mark is ignored, and lines starting with ``#`` are comments. A path listed twice with the same
label is written once (with a warning); listed with different labels it is left out.

Every video is opened and its first and last frames decoded, exactly as the trainer decodes them, before it
is written (images are decoded whole); one that cannot be read, or has no valid label or caption, is left out
and named on stderr with the reason (``left out: PATH: why``; the first 20, all of them in manifest.json).
The bytes are stored unchanged under a member name the trainer reads (``data.decode.VIDEO_EXTENSIONS``): the
file's own suffix where it is one, ``mp4`` for .m4v/.3gp/.3g2, ``mov`` for .qt and ``mkv`` for any other
(.mpg, .mpeg, ...); decord tells the container from the bytes, not the name. --short-side S re-encodes every
video with PyAV to H.264 (yuv420p, crf --crf, its own frame rate, no audio) with its shorter side S (never
enlarged); --max-seconds T keeps the first T seconds, re-encoding only videos longer than that (unless
--short-side is also given).

--workers N probes and re-encodes with N processes; the shards are the same for any N (items are written in
input order by this process). A shard closes once it holds --shard-size samples or --shard-size-mb MB, so its
contents depend only on the input. Each finished shard is recorded in manifest.json (written atomically), and
re-running the same command after an interruption keeps the finished shards that are there with their
recorded size and writes only the rest; a different command (other inputs, options or annotation contents)
is refused, naming what differs.

--out must hold no .tar files, unless the same command is being resumed or --overwrite is given: then the
shards named PREFIX-NNNNNN.tar there are replaced (other files are kept) once the first new shard is done, so
a run that writes nothing leaves the old shards as they were. One --out holds one pack (one prefix).

The last line printed names the shards as a brace pattern, as data.train_shards and friends take them.

Exit status: 0 when at least one sample was written, 1 when none was, 2 for a usage error, 130 when
interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import closing, contextmanager
from pathlib import Path

from tqdm import tqdm

from data.decode import VIDEO_EXTENSIONS
from data.formats import (
    FORMAT_ALIASES,
    FORMATS,
    Dataset,
    FormatError,
    Rejected,
    normalise_split,
    read_classes,
)
from data.packing import Job, packed, worker_pool
from data.writer import ShardTar, sample_members

MANIFEST, CLASSES = "manifest.json", "classes.txt"
MANIFEST_VERSION = 1
SHOWN = 20  # left-out entries and warnings named on stderr; manifest.json has them all


class Bar(tqdm):
    """tqdm without its monitor thread (the bar is updated at every item anyway): no thread outlives a pack,
    so a later pack in the same process may still fork its workers (``data.packing.pool_context``)."""

    monitor_interval = 0


class UsageError(Exception):
    """A problem with the command line or its inputs: one line to the user, exit status 2."""


# -- the output folder: manifest, resuming, refusing --------------------------------------------------------


def own_shards(out: Path, prefix: str) -> list[Path]:
    """The shards this tool writes under ``prefix``: PREFIX-NNNNNN.tar, the only files --overwrite removes."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    return sorted(path for path in out.glob("*.tar") if pattern.fullmatch(path.name) and path.is_file())


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def sync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a power cut after it must not bring the old name back)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_dir(path.parent)


def load_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none, or not ours: the .tar rule decides
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("inputs"), dict) else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(args: argparse.Namespace, dataset: Dataset, annotations: Path | None) -> dict:
    """What makes two runs the same command: the resume check compares this, key by key."""
    digest = hashlib.sha256()
    for item in dataset.items:  # the items as listed, with their files' sizes: a changed video changes it
        fields = [item.key, item.name, item.size, item.label, item.captions, item.meta]
        digest.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    files = [*dataset.sources, *([args.classes] if args.classes else [])]
    reencode = args.short_side is not None or args.max_seconds is not None
    inputs = {
        "version": MANIFEST_VERSION,
        "format": args.format,
        "split": args.split,
        "videos": str(args.videos.resolve()),
        "annotations": str(annotations.resolve()) if annotations else None,
        "classes": str(args.classes.resolve()) if args.classes else None,
        "files": {str(path.resolve()): sha256_file(path) for path in files},
        "prefix": args.prefix,
        "shard_size": args.shard_size,
        "shard_size_mb": args.shard_size_mb,
        "short_side": args.short_side,
        "max_seconds": args.max_seconds,
        "crf": args.crf if reencode else None,
        "items": len(dataset.items),
        "items_sha256": digest.hexdigest(),
    }
    return json.loads(json.dumps(inputs))  # as it reads back from the manifest (tuples -> lists, ...)


OPTION_NAMES = {
    "version": "the manifest version",
    "format": "--format",
    "split": "--split",
    "videos": "--videos",
    "annotations": "the annotations",
    "classes": "--classes",
    "prefix": "--prefix",
    "shard_size": "--shard-size",
    "shard_size_mb": "--shard-size-mb",
    "short_side": "--short-side",
    "max_seconds": "--max-seconds",
    "crf": "--crf",
}


def differences(old: dict, new: dict) -> list[str]:
    """How the inputs recorded in a manifest differ from this command's, in words."""
    text = lambda value: "not given" if value is None else repr(value)
    found = [
        f"{name} {text(old.get(key))} before, {text(new.get(key))} now"
        for key, name in OPTION_NAMES.items()
        if old.get(key) != new.get(key)
    ]
    old_files, new_files = old.get("files") or {}, new["files"]
    for path in sorted(set(old_files) | set(new_files)):
        if old_files.get(path) != new_files.get(path):
            state = "changed" if path in old_files and path in new_files else "was not read before"
            found.append(f"{Path(path).name} {state if path in new_files else 'is not read now'}")
    if (old.get("items"), old.get("items_sha256")) != (new["items"], new["items_sha256"]) and not found:
        found.append(
            f"the items listed or their files' sizes changed ({old.get('items')} items before, "
            f"{new['items']} now)"
        )
    return found


def plan_out(out: Path, prefix: str, overwrite: bool, inputs: dict) -> list[dict] | None:
    """The finished shards to keep when this run resumes the same command, or None for a fresh pack;
    raises UsageError when --out may not be written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    manifest = load_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest["inputs"] == inputs:
        return list(manifest.get("shards", []))
    old_prefix = manifest["inputs"].get("prefix") if manifest else None
    if old_prefix and old_prefix != prefix and own_shards(out, old_prefix):
        raise UsageError(
            f"--out: {out} holds the pack of --prefix {old_prefix} ({old_prefix}-NNNNNN.tar, {MANIFEST}); "
            "pack each split into its own --out"
        )
    tars = sorted(out.glob("*.tar")) if out.is_dir() else []
    if tars and not overwrite:
        names = ", ".join(path.name for path in tars[:3]) + (", ..." if len(tars) > 3 else "")
        files = f"{len(tars)} .tar file{'s' * (len(tars) > 1)}"
        other = ""
        if manifest is not None:
            unfinished = "an unfinished pack" if manifest.get("status") != "complete" else "the pack"
            other = (
                f" ({unfinished} of another command: {'; '.join(differences(manifest['inputs'], inputs))})"
            )
        raise UsageError(
            f"--out: {out} already holds {files} ({names}){other}; pass --overwrite to replace the "
            f"shards named {prefix}-NNNNNN.tar there, or choose an empty --out"
        )
    return None


def verify(out: Path, shards: list[dict]) -> tuple[list[dict], str | None]:
    """The recorded shards still there with their recorded size, up to the first that is not (and why)."""
    for number, record in enumerate(shards):
        path = out / record["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != record["bytes"]:
            found = "missing" if size is None else f"{size} bytes, not the recorded {record['bytes']}"
            return shards[:number], f"{record['name']} is {found}: writing from it on"
    return shards, None


@contextmanager
def locked(out: Path):
    """One make_shards at a time per --out (a second would interleave shards and manifests)."""
    import fcntl

    path = out / ".make_shards.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UsageError(f"--out: another make_shards is writing into {out}") from exc
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


class Pack:
    """The shards of one pack and its manifest, committed shard by shard (tar first, then the manifest)."""

    def __init__(self, args, dataset: Dataset, inputs: dict, finished: list[dict]):
        self.args, self.dataset, self.inputs = args, dataset, inputs
        self.out, self.prefix = args.out, args.prefix
        self.shards = finished
        self.trailing: list[Rejected] = []  # left out after the last shard's last sample
        self.claimed = False

    @property
    def samples(self) -> int:
        return sum(record["samples"] for record in self.shards)

    def rejected(self) -> list[dict]:
        listed = [entry.to_json() for entry in self.dataset.rejected]
        listed += [entry for record in self.shards for entry in record["rejected"]]
        return listed + [entry.to_json() for entry in self.trailing]

    def manifest(self, status: str) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "status": status,
            "command": shlex.join(["python", "-m", "launch.make_shards", *self.args.argv]),
            "format": self.args.format,
            "split": self.args.split,
            "kind": self.dataset.kind,
            "classes": len(self.dataset.classes) if self.dataset.classes is not None else None,
            "entries": self.dataset.total,
            "samples": self.samples,
            "shards": self.shards,
            "rejected": self.rejected(),
            "warnings": self.dataset.warnings,
            "inputs": self.inputs,
        }

    def write_manifest(self, status: str = "running") -> None:
        write_atomic(self.out / MANIFEST, json.dumps(self.manifest(status), indent=1) + "\n")

    def claim(self, keep: Path | None = None) -> None:
        """Make --out this pack's, once, before its first new shard moves in: record the command, then
        remove the shards it does not record (an earlier pack's, or the unrecorded last shard of an
        interrupted run) and unfinished files; write classes.txt."""
        if self.claimed:
            return
        self.write_manifest()
        recorded = {record["name"] for record in self.shards}
        for path in own_shards(self.out, self.prefix):
            if path.name not in recorded:
                path.unlink()
        for path in self.out.glob(f".{self.prefix}-*.tar.partial"):
            if path != keep:
                path.unlink()
        if self.dataset.classes is not None:
            write_atomic(self.out / CLASSES, "".join(f"{name}\n" for name in self.dataset.classes))
        else:  # an earlier pack's class names would describe shards no longer there
            (self.out / CLASSES).unlink(missing_ok=True)
        self.claimed = True

    def partial(self) -> ShardTar:
        return ShardTar(self.out / f".{shard_name(self.prefix, len(self.shards))}.partial")

    def commit(self, shard: ShardTar, first: int, end: int, rejected: list[Rejected]) -> dict:
        """Finish ``shard``, holding items[first:end] but ``rejected``, move it in and record it."""
        size, digest = shard.close(sync=True)
        self.claim(keep=shard.path)
        name = shard_name(self.prefix, len(self.shards))
        os.replace(shard.path, self.out / name)
        sync_dir(self.out)  # the shard is in place for good before the manifest says so
        record = {
            "name": name,
            "samples": shard.count,
            "bytes": size,
            "sha256": digest,
            "items": [first, end],
            "rejected": [entry.to_json() for entry in rejected],
        }
        self.shards.append(record)
        self.write_manifest()
        return record

    def finish(self) -> None:
        if self.samples:
            self.claim()
            self.write_manifest("complete")


def run_pack(pack: Pack, job: Job, workers: int, start: int) -> set[tuple[str, str]]:
    """Pack items[start:] into shards. -> the (suffix, member) renames of videos stored under another name."""
    args, items, unit = pack.args, pack.dataset.items, pack.dataset.kind
    limit_count = args.shard_size or 1 << 62
    limit_bytes = int(args.shard_size_mb * 2**20)
    renamed: set[tuple[str, str]] = set()
    shard: ShardTar | None = None
    first, rejected = start, []
    left_out = len(pack.rejected())  # counted as it grows: listing them per item would be quadratic
    with worker_pool(job, workers) as pool:
        began = time.monotonic()
        bar = Bar(
            total=len(items), initial=start, unit=unit, dynamic_ncols=True, disable=not sys.stderr.isatty()
        )
        try:
            with closing(packed(items, start, pool, workers)) as results:
                for index, result in results:
                    item = items[index]
                    bar.update(1)
                    if result[0] == "rejected":
                        where = item.name if item.name != item.ident else None
                        rejected.append(Rejected(item.ident, result[1], result[2], where))
                        left_out += 1
                        bar.set_postfix(shards=len(pack.shards), left_out=left_out, refresh=False)
                        continue
                    _, extension, data, probed = result
                    meta = {**probed, "path": item.name, **item.meta}
                    if item.captions is not None:
                        meta["captions"] = item.captions
                    if unit == "video" and "reencoded_from" not in meta:
                        renamed.add((Path(item.name).suffix.lower(), extension))
                    shard = shard or pack.partial()
                    shard.add(item.key, sample_members(extension, data, item.label, meta))
                    # closed once full, not when the next sample comes: a full shard is committed at once
                    if shard.count >= limit_count or shard.size >= limit_bytes:
                        record = pack.commit(shard, first, index + 1, rejected)
                        shard, first, rejected = None, index + 1, []
                        report(record, index + 1 - start, len(items) - index - 1, began, unit)
                        bar.set_postfix(shards=len(pack.shards), left_out=left_out, refresh=False)
            if shard is not None:
                record = pack.commit(shard, first, len(items), rejected)
                shard, rejected = None, []
                report(record, len(items) - start, 0, began, unit)
            pack.trailing = rejected
        finally:
            bar.close()
            if shard is not None:  # interrupted inside a shard: its unfinished file goes
                shard.discard()
    return renamed


def report(record: dict, done: int, left: int, began: float, unit: str) -> None:
    """One line per finished shard (also in logs, where no progress bar is drawn)."""
    rate = done / max(time.monotonic() - began, 1e-9)
    eta = tqdm.format_interval(left / rate) if rate > 0 else "?"
    tqdm.write(
        f"{record['name']}: {record['samples']} {unit}s, {record['bytes'] / 2**20:.1f} MiB; "
        f"{rate:.1f} {unit}s/s, {left} left, ETA {eta}",
        file=sys.stderr,
    )


# -- the command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.make_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = sorted([*FORMATS, *FORMAT_ALIASES])
    parser.add_argument("--format", default="csv", choices=names, help="the annotation format (default csv)")
    parser.add_argument(
        "--videos", "--images", required=True, type=Path, help="the media folder the annotations name"
    )
    parser.add_argument("--labels", type=Path, help="--format csv: CSV of path,label (header optional)")
    parser.add_argument("--annotations", type=Path, help="the format's annotation file or folder")
    parser.add_argument("--split", help="train, validation or test, for formats with splits")
    parser.add_argument(
        "--classes", type=Path, help="classes.txt giving the class indices (kinetics, imagenet)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards; must hold no .tar")
    parser.add_argument("--prefix", default="shard", help="shards are named PREFIX-000000.tar, ...")
    parser.add_argument("--shard-size-mb", type=float, default=1024.0, help="close a shard at this size")
    parser.add_argument("--shard-size", type=int, help="close a shard at this many samples")
    parser.add_argument("--workers", type=int, default=1, help="processes probing and re-encoding")
    parser.add_argument("--short-side", type=int, help="re-encode videos to this shorter side (even)")
    parser.add_argument("--max-seconds", type=float, help="keep at most this many seconds of each video")
    parser.add_argument(
        "--crf", type=int, default=23, help="x264 quality when re-encoding (0-51, lower=better)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the PREFIX-NNNNNN.tar shards already in --out"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.format = FORMAT_ALIASES.get(args.format, args.format)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:  # a killed job (SLURM's SIGTERM) stops as cleanly as Ctrl-C: the partial shard is removed
        signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(args)
    except (UsageError, FormatError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def annotation_path(args: argparse.Namespace, spec) -> Path | None:
    """The annotation file or folder of --format, checked; raises UsageError."""
    if args.labels is not None and args.format != "csv":
        raise UsageError(f"--labels is the csv format's; --format {args.format} reads --annotations")
    path = args.labels if args.labels is not None else args.annotations
    option = "--labels" if args.labels is not None or args.format == "csv" else "--annotations"
    if spec.annotations is None:
        if path is not None:
            raise UsageError(f"--format {args.format} reads no annotations (its classes are the folders)")
        return None
    if path is None:
        needs = "--labels FILE.csv" if args.format == "csv" else f"--annotations {spec.annotations.upper()}"
        raise UsageError(f"--format {args.format} needs {needs}")
    if not path.exists():
        raise UsageError(f"{option}: {path} does not exist")
    if spec.annotations == "folder" and not path.is_dir():
        raise UsageError(f"{option}: {path} is not a folder (--format {args.format} reads a folder of files)")
    if spec.annotations == "file" and not path.is_file():
        raise UsageError(f"{option}: {path} is not a file")
    return path


def check_args(args: argparse.Namespace, spec) -> None:
    if not args.videos.is_dir():
        raise UsageError(f"--videos: {args.videos} is not a directory")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        raise UsageError(f"--prefix: {args.prefix!r} must be a non-empty file name prefix")
    args.split = normalise_split(args.split)
    if spec.splits is None and args.split:
        raise UsageError(f"--format {args.format} has no splits; leave out --split")
    if spec.split_required and not args.split:
        raise UsageError(f"--format {args.format} needs --split {'|'.join(spec.splits)}")
    if spec.splits and args.split not in spec.splits:
        raise UsageError(f"--split: {args.split!r} is not one of {', '.join(spec.splits)}")
    if args.classes is not None and spec.own_classes:
        raise UsageError(
            f"--format {args.format} reads its classes from its annotations; leave out --classes"
        )
    if args.workers < 1:
        raise UsageError(f"--workers: {args.workers} must be at least 1")
    if args.shard_size is not None and args.shard_size < 1:
        raise UsageError(f"--shard-size: {args.shard_size} must be at least 1")
    if not args.shard_size_mb > 0:
        raise UsageError(f"--shard-size-mb: {args.shard_size_mb} must be positive")
    if args.short_side is not None and (args.short_side < 2 or args.short_side % 2):
        raise UsageError(f"--short-side: {args.short_side} must be even and positive (H.264 in yuv420p)")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise UsageError(f"--max-seconds: {args.max_seconds} must be positive")
    if not 0 <= args.crf <= 51:
        raise UsageError(f"--crf: {args.crf} must be within 0-51")
    if spec.kind == "image" and (args.short_side is not None or args.max_seconds is not None):
        raise UsageError(
            f"--short-side and --max-seconds re-encode videos; --format {args.format} packs images"
        )


def shown(lines: list[str]) -> list[str]:
    """At most SHOWN lines, then how many more manifest.json holds."""
    more = len(lines) - SHOWN
    return lines[:SHOWN] + ([f"... and {more} more (all in {MANIFEST})"] if more > 0 else [])


def named(entry: dict) -> str:
    return entry["item"] + (f" ({entry['path']})" if entry.get("path") else "")


def run(args: argparse.Namespace) -> int:
    spec = FORMATS[args.format]
    check_args(args, spec)
    annotations = annotation_path(args, spec)
    classes = None
    if args.classes is not None:
        try:
            classes = read_classes(args.classes)
        except FormatError as exc:
            raise UsageError(f"--classes: {exc}") from exc
    option = "--labels" if args.format == "csv" else "--annotations"
    try:
        dataset = spec.reader(args.videos, annotations, args.split, classes)
    except FormatError as exc:
        raise UsageError(f"{option}: {exc}") from exc
    inputs = fingerprint(args, dataset, annotations)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    unit = dataset.kind
    args.out.mkdir(parents=True, exist_ok=True)
    with locked(args.out):
        finished = plan_out(args.out, args.prefix, args.overwrite, inputs)
        for line in dataset.notes:
            print(f"note: {line}", file=sys.stderr)
        for line in shown(dataset.warnings):
            print(f"warning: {line}", file=sys.stderr)
        kept = 0
        if finished is not None:
            finished, problem = verify(args.out, finished)
            if problem:
                print(f"warning: {problem}", file=sys.stderr)
            kept = len(finished)
        pack = Pack(args, dataset, inputs, finished or [])
        start = finished[-1]["items"][1] if finished else 0
        if kept and start >= len(dataset.items):
            print(
                f"note: the {kept} shards of this command are all there; nothing left to write",
                file=sys.stderr,
            )
        elif kept:
            print(f"note: resuming: keeping {kept} finished shards ({pack.samples} {unit}s)", file=sys.stderr)
        job = Job(unit, args.short_side, args.max_seconds, args.crf)
        try:
            renamed = run_pack(pack, job, args.workers, start)
        except KeyboardInterrupt:
            print(
                f"interrupted: {len(pack.shards)} finished shards ({pack.samples} {unit}s) are kept in "
                f"{args.out}; re-run the same command to write the rest",
                file=sys.stderr,
            )
            return 130
        pack.finish()

    renamed -= {(f".{ext}", ext) for ext in VIDEO_EXTENSIONS}
    for suffix, member in sorted(renamed):
        print(
            f"note: {suffix or 'suffix-less'} videos are stored as .{member} members (the trainer reads only "
            f"{', '.join(VIDEO_EXTENSIONS)}; the bytes are unchanged)",
            file=sys.stderr,
        )
    left_out = pack.rejected()
    for line in shown([f"{named(entry)}: {entry['reason']}" for entry in left_out]):
        print(f"left out: {line}", file=sys.stderr)
    kinds = Counter(entry["kind"] for entry in left_out)
    breakdown = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    where = f"; see {args.out / MANIFEST}" if pack.samples else ""
    print(
        f"wrote {pack.samples} of {dataset.total} {unit}s into {len(pack.shards)} shards under {args.out}"
        + (f" ({kept} kept from an earlier run)" if kept else "")
        + (f"; left out {len(left_out)}: {breakdown}{where}" if left_out else "")
    )
    if pack.shards:  # what a config's data.*_shards takes
        last = len(pack.shards) - 1
        names = shard_name(args.prefix, 0) if last == 0 else f"{args.prefix}-{{000000..{last:06d}}}.tar"
        print(f"shards: {args.out / names}")
    return 0 if pack.samples else 1


if __name__ == "__main__":
    sys.exit(main())
