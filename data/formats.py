"""Readers of dataset annotation formats -> the items ``launch.make_shards`` packs into shards.

A reader takes the media folder (``--videos``), the format's annotation file or folder and the split, and
returns a ``Dataset``: the items to pack in input order (sample key, source file, label and/or captions),
the class names where the format has classes (index = position), and the entries left out before any file
is opened (no such file, unknown label, no caption, ...), each with its reason. Nothing here decodes media:
``launch.make_shards`` probes every item as the trainer would decode it.

Formats (``FORMATS``): ``csv`` (``path,label``), ``ssv2``, ``kinetics`` (k400/k600/k700), ``msrvtt``,
``vatex``, ``imagenet`` (class folders of images), ``captions-csv`` / ``captions-json`` (custom retrieval
sets). Each reader's docstring gives the layout it reads.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data.decode import VIDEO_EXTENSIONS
from data.writer import safe_key

# Suffixes of video files: what the id-named formats look up and what marks a CSV cell as a video path.
VIDEO_SUFFIXES = {*VIDEO_EXTENSIONS, "m4v", "3gp", "3g2", "qt", "mpg", "mpeg", "m2v", "ts", "m2ts", "mts",
                  "vob", "flv", "wmv", "asf", "ogv", "ogg", "mxf", "y4m", "ivf", "dv", "f4v"}  # fmt: skip
IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
SPLIT_ALIASES = {"val": "validation", "validate": "validation", "valid": "validation"}


class FormatError(Exception):
    """The annotations cannot be read as the format says (missing file, bad JSON, missing column)."""


@dataclass
class Item:
    """One sample to pack."""

    key: str  # the sample key, already safe for WebDataset (no dots)
    name: str  # the source as people know it: its path relative to --videos
    path: Path
    size: int  # bytes on disk when listed (part of the resume fingerprint)
    label: int | None = None
    captions: list[str] | None = None
    meta: dict = field(default_factory=dict)  # stored in KEY.json beside the probe's metadata
    ident: str = ""  # how the annotations name it (an id; the path by default), in messages

    def __post_init__(self):
        self.ident = self.ident or self.name


@dataclass
class Rejected:
    """An entry left out, and why. ``kind``: missing, unreadable, undecodable, label, caption, duplicate,
    annotation."""

    name: str  # the item as the annotations name it
    kind: str
    reason: str
    path: str | None = None  # its file under --videos, where the annotations name it otherwise

    def to_json(self) -> dict:
        where = {"path": self.path} if self.path else {}
        return {"item": self.name, **where, "kind": self.kind, "reason": self.reason}


@dataclass
class Dataset:
    kind: str  # "video" or "image"
    items: list[Item]
    rejected: list[Rejected]
    total: int  # entries considered (items + rejected)
    classes: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)  # annotation files read


@dataclass(frozen=True)
class Format:
    reader: Callable[..., Dataset]
    annotations: str | None  # "file", "folder", or None (no annotations)
    splits: tuple[str, ...] | None  # None: the format has no splits; () : any value of its split column
    split_required: bool = False
    kind: str = "video"
    own_classes: bool = False  # the classes come from the annotations; --classes does not apply


def normalise_split(split: str | None) -> str | None:
    return SPLIT_ALIASES.get(split.lower(), split.lower()) if split else split


# -- shared helpers -----------------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise FormatError(f"{path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc


def read_table(path: Path) -> list[tuple[int, list[str]]]:
    """A CSV's non-blank, non-comment rows as (line, cells); the UTF-8 byte-order mark is dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            return [
                (reader.line_num, cells)
                for cells in reader
                if any(cell.strip() for cell in cells) and not cells[0].lstrip().startswith("#")
            ]
    except FileNotFoundError as exc:
        raise FormatError(f"{path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise FormatError(f"{path} is not a readable CSV: {exc}") from exc


def read_columns(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV with a header row -> (its column names, (line, {column: cell}) rows); names are compared in
    lower case, cells trimmed, missing trailing cells read as empty."""
    rows = read_table(path)
    if not rows:
        raise FormatError(f"{path} is empty")
    header = [cell.strip().lower() for cell in rows[0][1]]
    missing = [name for name in required if name not in header]
    if missing:
        raise FormatError(
            f"{path} has no column {', '.join(missing)} in its header (found: {', '.join(header)})"
        )
    padded = lambda cells: [cell.strip() for cell in cells] + [""] * (len(header) - len(cells))
    return header, [(line, dict(zip(header, padded(cells), strict=False))) for line, cells in rows[1:]]


def stat_file(videos: Path, relative: str) -> tuple[Path, int] | tuple[None, str]:
    """(path, size) of a listed file, or (None, reason) when it is no readable file under ``videos``."""
    path = videos / relative
    try:
        info = path.stat()
    except FileNotFoundError:
        return None, "no such file under --videos"
    except PermissionError:
        return None, "permission denied"
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    if path.is_dir():
        return None, "is a directory, not a video file"
    return path, info.st_size


class MediaIndex:
    """The media files under a folder (recursively, symlinks followed) by file stem, for formats that name
    videos by id: ``<id>.webm`` flat, or ``<class>/<id>.mp4`` in class folders, found alike."""

    def __init__(self, root: Path, suffixes: set[str], prefer: str):
        found: dict[str, list[tuple[Path, int]]] = {}
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs.sort()
            for name in sorted(files):
                stem, _, suffix = name.rpartition(".")
                if stem and not name.startswith(".") and suffix.lower() in suffixes:
                    path = Path(folder) / name
                    try:
                        found.setdefault(stem, []).append((path, path.stat().st_size))
                    except OSError:  # a dangling link: as good as missing
                        continue
        self.root, self.prefer = root, prefer
        self.files: dict[str, tuple[Path, int]] = {}
        self.ambiguous: list[str] = []
        for stem, paths in found.items():
            # the format's own suffix first, then the first path in sorted order
            paths.sort(key=lambda entry: (entry[0].suffix.lower() != f".{prefer}", str(entry[0])))
            self.files[stem] = paths[0]
            if len(paths) > 1:
                self.ambiguous.append(f"{stem} ({', '.join(self.relative(p) for p, _ in paths)})")

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def warnings(self) -> list[str]:
        if not self.ambiguous:
            return []
        shown = "; ".join(self.ambiguous[:3]) + ("; ..." if len(self.ambiguous) > 3 else "")
        return [
            f"{len(self.ambiguous)} ids have several files under --videos, the first of each is used: {shown}"
        ]

    def item(self, stem: str, key: str, **fields) -> Item | Rejected:
        found = self.files.get(stem)
        if found is None:
            return Rejected(
                stem, "missing", f"no {stem}.{self.prefer} (or other video file {stem}.*) under --videos"
            )
        path, size = found
        return Item(key=key, name=self.relative(path), path=path, size=size, ident=stem, **fields)


def unique_keys(items: list[Item]) -> tuple[list[Item], list[Rejected]]:
    """Items whose sample keys are distinct: ids made equal by ``safe_key`` (``a.b`` and ``a_b``) would merge
    into one sample in a shard, so the later one is left out."""
    kept: list[Item] = []
    rejected: list[Rejected] = []
    owners: dict[str, str] = {}
    for item in items:
        if item.key in owners:
            why = f"its sample key {item.key} is already {owners[item.key]}'s"
            rejected.append(
                Rejected(item.ident, "duplicate", why, item.name if item.name != item.ident else None)
            )
            continue
        owners[item.key] = item.ident
        kept.append(item)
    return kept, rejected


def dedupe(
    entries: list[tuple[str, Item | Rejected]], warnings: list[str]
) -> tuple[list[Item], list[Rejected]]:
    """Entries by id, in first-listed order: an id listed again with the same label is kept once (warned);
    listed with different labels, it is left out."""
    by_id: dict[str, list[Item | Rejected]] = {}
    for ident, entry in entries:
        by_id.setdefault(ident, []).append(entry)
    items: list[Item] = []
    rejected: list[Rejected] = []
    for ident, listed in by_id.items():
        first = listed[0]
        if isinstance(first, Rejected):
            rejected.append(first)
            continue
        labels = {entry.label for entry in listed if isinstance(entry, Item)}
        if len(labels) > 1:
            shown = ", ".join(map(str, sorted(labels, key=str)))
            rejected.append(Rejected(first.ident, "label", f"listed {len(listed)} times with labels {shown}"))
            continue
        if len(listed) > 1:
            warnings.append(f"{ident} is listed {len(listed)} times; written once")
        items.append(first)
    items, clashes = unique_keys(items)
    return items, rejected + clashes


def read_classes(path: Path) -> list[str]:
    """A classes.txt: one class name per line, index = line number (0-based); blank lines are errors."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise FormatError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names:
        raise FormatError(f"{path}: one class name per line, no blank lines")
    if len(set(names)) != len(names):
        raise FormatError(f"{path} names a class twice")
    return names


def first_existing(folder: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FormatError(f"{folder} holds no {what} ({' or '.join(names)})")


# -- csv: path,label ----------------------------------------------------------------------------------------


def parse_label(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def is_header(path: str, second: str, videos: Path, labelled: bool = True) -> bool:
    """A first row is a header when its second cell is no integer label (for ``path,label``) and its path
    cell names no video: not a file there, and no media suffix (a video with a bad label stays a data row,
    reported as such)."""
    if (labelled and parse_label(second) is not None) or not path:
        return False
    suffix = Path(path).suffix.lstrip(".").lower()
    return not (videos / path).is_file() and suffix not in VIDEO_SUFFIXES | IMAGE_SUFFIXES


def grouped(rows: list[tuple[int, str, str]]) -> dict[str, list[tuple[int, str, str]]]:
    """(line, path, value) rows by normalised path ("./a.mp4" and "a.mp4" are one video), in listed order."""
    groups: dict[str, list[tuple[int, str, str]]] = {}
    for row in rows:
        groups.setdefault(os.path.normpath(row[1]) if row[1] else "", []).append(row)
    return groups


def lines(rows: list[tuple[int, str, str]]) -> str:
    return ", ".join(str(row[0]) for row in rows)


def table_rows(path: Path, videos: Path, labelled: bool, notes: list[str]) -> list[tuple[int, str, str]]:
    """``path,value`` rows as (line, path, value); a header row is dropped with a note. A label is the second
    cell (later ones are ignored); a caption with unquoted commas is rejoined."""
    rows = [
        (
            line,
            cells[0].strip(),
            (cells[1] if labelled else ",".join(cells[1:])).strip() if len(cells) > 1 else "",
        )
        for line, cells in read_table(path)
    ]
    if rows and is_header(rows[0][1], rows[0][2], videos, labelled):
        line, first, second = rows[0]
        notes.append(f"line {line} {first!r},{second!r} read as a header")
        return rows[1:]
    return rows


def choose_label(path: str, rows: list[tuple[int, str, str]], classes: list[str] | None) -> int | Rejected:
    # "3" and "03" are one label; text labels are compared as written
    values = {label if (label := parse_label(row[2])) is not None else row[2] for row in rows}
    if len(values) > 1:
        listed = ", ".join(f"{row[2]!r} (line {row[0]})" for row in rows)
        return Rejected(path, "label", f"listed with conflicting labels {listed}; fix the CSV to keep it")
    label = parse_label(rows[0][2])
    if label is None:
        return Rejected(
            path, "label", f"label {rows[0][2]!r} (line {lines(rows)}) is not a non-negative integer"
        )
    if classes is not None and label >= len(classes):
        return Rejected(
            path,
            "label",
            f"label {label} (line {lines(rows)}) is not below the {len(classes)} classes of --classes",
        )
    return label


def read_csv(videos: Path, annotations: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """``path,label``: one row per video, paths relative to --videos, labels non-negative integers (index
    into --classes when given). A header row is recognised under any names, a byte-order mark is ignored,
    ``#`` lines are comments. A path listed twice with one label is written once; with two, left out."""
    notes: list[str] = []
    warnings: list[str] = []
    groups = grouped(table_rows(annotations, videos, True, notes))
    items: list[Item] = []
    rejected: list[Rejected] = []
    for index, (relative, rows) in enumerate(groups.items()):
        if not relative:
            rejected.append(Rejected(f"line {lines(rows)}", "annotation", "no path"))
            continue
        label = choose_label(relative, rows, classes)
        if isinstance(label, Rejected):
            rejected.append(label)
            continue
        if len(rows) > 1:
            warnings.append(
                f"{relative} is listed {len(rows)} times (lines {lines(rows)}) with label {label}; "
                "written once"
            )
        path, size = stat_file(videos, relative)
        if path is None:
            rejected.append(Rejected(relative, "missing", size))
            continue
        key = safe_key(f"{index:08d}_{Path(relative).stem}")
        items.append(Item(key, relative, path, size, label=label))
    return Dataset("video", items, rejected, len(groups), classes, warnings, notes, [annotations])


# -- Something-Something v2 ---------------------------------------------------------------------------------


def read_ssv2(videos: Path, folder: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """Something-Something v2: ``labels.json`` maps each template (no brackets) to its index as a string;
    ``train.json`` / ``validation.json`` list ``{"id", "label", "template", "placeholders"}`` (the template
    with ``[something]`` brackets); ``test.json`` lists ids only (unlabelled). Videos are ``<id>.webm``.
    The release's ``something-something-v2-*.json`` names are read too."""
    labels_path = first_existing(folder, ["labels.json", "something-something-v2-labels.json"], "labels file")
    split_path = first_existing(
        folder, [f"{split}.json", f"something-something-v2-{split}.json"], f"{split} list"
    )
    mapping = read_json(labels_path)
    if not isinstance(mapping, dict):
        raise FormatError(f"{labels_path} is not an object mapping templates to indices")
    try:
        by_index = {int(index): name for name, index in mapping.items()}
    except (TypeError, ValueError) as exc:
        raise FormatError(f'{labels_path}: every value must be an index such as "0" ({exc})') from exc
    if sorted(by_index) != list(range(len(mapping))):
        raise FormatError(f"{labels_path}: the indices must be 0..{len(mapping) - 1}, each once")
    names = [by_index[index] for index in range(len(mapping))]
    index_of = {name: index for index, name in enumerate(names)}
    entries = read_json(split_path)
    if not isinstance(entries, list):
        raise FormatError(f"{split_path} is not a list of videos")
    index = MediaIndex(videos, VIDEO_SUFFIXES, "webm")
    listed: list[tuple[str, Item | Rejected]] = []
    for position, entry in enumerate(entries):
        ident = str(entry.get("id", "")).strip() if isinstance(entry, dict) else ""
        if not ident:
            listed.append(
                (f"#{position}", Rejected(f"{split_path.name} entry {position}", "annotation", "no id"))
            )
            continue
        label = None
        meta: dict = {"id": ident}
        if split != "test":
            template = str(entry.get("template", "")).replace("[", "").replace("]", "")
            if template not in index_of:
                listed.append(
                    (ident, Rejected(ident, "label", f"template {template!r} is not in {labels_path.name}"))
                )
                continue
            label = index_of[template]
            meta.update({"class": template, **({"text": entry["label"]} if "label" in entry else {})})
        listed.append((ident, index.item(ident, safe_key(ident), label=label, meta=meta)))
    warnings = index.warnings()
    items, rejected = dedupe(listed, warnings)
    return Dataset("video", items, rejected, len(entries), names, warnings, [], [labels_path, split_path])


# -- Kinetics 400/600/700 -----------------------------------------------------------------------------------


def read_kinetics(videos: Path, table: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """Kinetics: a CSV ``label,youtube_id,time_start,time_end,split[,is_cc]`` (the test release may lack
    ``label``: unlabelled). Videos ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` anywhere under
    --videos (flat or in class folders). Class index = position among the sorted labels of the rows read,
    or in --classes. Videos that never downloaded are left out and counted, as Kinetics always has some."""
    header, rows = read_columns(table, ("youtube_id", "time_start", "time_end"))
    if split:
        if "split" not in header:
            raise FormatError(f"{table} has no split column to pick --split {split} from")
        rows = [(line, row) for line, row in rows if normalise_split(row.get("split", "")) == split]
        if not rows:
            raise FormatError(f"{table} has no row of split {split!r}")
    labelled = "label" in header
    if labelled and classes is None:
        classes = sorted({row["label"] for _, row in rows if row["label"]})
    index_of = {name: i for i, name in enumerate(classes or [])}
    index = MediaIndex(videos, VIDEO_SUFFIXES, "mp4")
    listed: list[tuple[str, Item | Rejected]] = []
    for line, row in rows:
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError:
            bad = f"{row['youtube_id']} (line {line})"
            listed.append(
                (
                    bad,
                    Rejected(
                        bad, "annotation", f"times {row['time_start']!r}, {row['time_end']!r} are not numbers"
                    ),
                )
            )
            continue
        stem = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        label = None
        meta = {"youtube_id": row["youtube_id"], "time_start": start, "time_end": end}
        if labelled:
            name = row["label"]
            if name not in index_of:
                why = "no label" if not name else f"label {name!r} is not in --classes"
                listed.append((stem, Rejected(stem, "label", f"{why} (line {line})")))
                continue
            label, meta["class"] = index_of[name], name
        listed.append((stem, index.item(stem, safe_key(stem), label=label, meta=meta)))
    warnings = index.warnings()
    items, rejected = dedupe(listed, warnings)
    missing = sum(entry.kind == "missing" for entry in rejected)
    notes = (
        [f"{missing} of {len(listed)} videos are not under --videos (never downloaded?)"] if missing else []
    )
    return Dataset("video", items, rejected, len(listed), classes, warnings, notes, [table])


# -- MSR-VTT ------------------------------------------------------------------------------------------------


def read_msrvtt(videos: Path, folder: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """MSR-VTT: ``MSRVTT_data.json`` (``videos`` with ``video_id`` and ``split``, ``sentences`` with
    ``video_id`` and ``caption``); videos ``<video_id>.mp4``. train = ``MSRVTT_train.9k.csv`` (column
    ``video_id``) when present, else the JSON's train split; validation = the JSON's validate split; test =
    the 1k-A list ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``: one caption per video)
    when present, else the JSON's test split with all its captions."""
    data_path = first_existing(folder, ["MSRVTT_data.json"], "MSRVTT_data.json")
    data = read_json(data_path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
        raise FormatError(f"{data_path} has no 'videos' list")
    info = {str(v.get("video_id")): v for v in data["videos"] if isinstance(v, dict)}
    sentences: dict[str, list[str]] = {}
    for sentence in data.get("sentences", []):
        if isinstance(sentence, dict) and isinstance(sentence.get("caption"), str):
            sentences.setdefault(str(sentence.get("video_id")), []).append(sentence["caption"])
    sources, notes = [data_path], []
    train_list, test_list = folder / "MSRVTT_train.9k.csv", folder / "MSRVTT_JSFUSION_test.csv"
    captions: dict[str, list[str]] = {}
    if split == "train" and train_list.is_file():
        ids = [row["video_id"] for _, row in read_columns(train_list, ("video_id",))[1]]
        sources.append(train_list)
        notes.append(f"train: the {len(ids)} videos of {train_list.name}")
    elif split == "test" and test_list.is_file():
        ids = []
        for _, row in read_columns(test_list, ("video_id", "sentence"))[1]:
            ids.append(row["video_id"])
            captions.setdefault(row["video_id"], []).append(row["sentence"])
        sources.append(test_list)
        notes.append(f"test: the 1k-A list of {test_list.name} ({len(ids)} videos, its captions)")
    else:
        wanted = {"train": "train", "validation": "validate", "test": "test"}[split]
        ids = [ident for ident, video in info.items() if video.get("split") == wanted]
        notes.append(f"{split}: the {len(ids)} videos of {data_path.name}'s {wanted} split")
    index = MediaIndex(videos, VIDEO_SUFFIXES, "mp4")
    listed: list[tuple[str, Item | Rejected]] = []
    for ident in ids:
        texts = [text.strip() for text in captions.get(ident, sentences.get(ident, [])) if text.strip()]
        if not texts:
            listed.append((ident, Rejected(ident, "caption", "no caption")))
            continue
        meta = {"video_id": ident}
        if "category" in info.get(ident, {}):
            meta["category"] = info[ident]["category"]
        listed.append((ident, index.item(ident, safe_key(ident), captions=texts, meta=meta)))
    warnings = index.warnings()
    items, rejected = dedupe(listed, warnings)
    return Dataset("video", items, rejected, len(listed), None, warnings, notes, sources)


# -- VATEX --------------------------------------------------------------------------------------------------


def read_vatex(videos: Path, path: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """VATEX: a JSON list of ``{"videoID", "enCap": [captions]}``; videos ``<videoID>.mp4``."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise FormatError(f"{path} is not a list of videos")
    index = MediaIndex(videos, VIDEO_SUFFIXES, "mp4")
    listed: list[tuple[str, Item | Rejected]] = []
    for position, entry in enumerate(entries):
        ident = str(entry.get("videoID", "")).strip() if isinstance(entry, dict) else ""
        if not ident:
            listed.append(
                (f"#{position}", Rejected(f"{path.name} entry {position}", "annotation", "no videoID"))
            )
            continue
        raw = entry.get("enCap") or []
        texts = [
            text.strip()
            for text in ([raw] if isinstance(raw, str) else raw)
            if isinstance(text, str) and text.strip()
        ]
        if not texts:
            listed.append((ident, Rejected(ident, "caption", "no English caption (enCap)")))
            continue
        listed.append((ident, index.item(ident, safe_key(ident), captions=texts, meta={"video_id": ident})))
    warnings = index.warnings()
    items, rejected = dedupe(listed, warnings)
    return Dataset("video", items, rejected, len(listed), None, warnings, [], [path])


# -- ImageNet-style class folders ---------------------------------------------------------------------------


def read_imagenet(
    images: Path, annotations: Path | None, split: str | None, classes: list[str] | None
) -> Dataset:
    """Class folders of images (``train/n01440764/*.JPEG``): class index = position of the folder name
    among the sorted folder names, or in --classes. Images may sit deeper inside their class folder."""
    folders = sorted(
        entry.name for entry in os.scandir(images) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not folders:
        raise FormatError(
            f"{images} holds no class folders (images go in <class>/<image>; "
            "an ImageNet val/ must be sorted into class folders first)"
        )
    names = classes if classes is not None else folders
    index_of = {name: i for i, name in enumerate(names)}
    items: list[Item] = []
    rejected: list[Rejected] = []
    notes: list[str] = []
    loose = [entry.name for entry in os.scandir(images) if entry.is_file()]
    if loose:
        notes.append(f"{len(loose)} files directly in {images} (outside any class folder) are not read")
    other = 0
    for folder in folders:
        found = []
        for root, dirs, files in os.walk(images / folder, followlinks=True):
            dirs.sort()
            found += [Path(root) / name for name in sorted(files) if not name.startswith(".")]
        for path in found:
            relative = path.relative_to(images).as_posix()
            if path.suffix.lstrip(".").lower() not in IMAGE_SUFFIXES:
                other += 1
                continue
            if folder not in index_of:
                rejected.append(Rejected(relative, "label", f"class folder {folder!r} is not in --classes"))
                continue
            try:
                size = path.stat().st_size
            except OSError as exc:
                rejected.append(Rejected(relative, "unreadable", f"cannot be read: {exc.strerror or exc}"))
                continue
            key = safe_key(relative.rsplit(".", 1)[0])
            items.append(Item(key, relative, path, size, label=index_of[folder], meta={"class": folder}))
    if other:
        notes.append(f"{other} files in the class folders are not images by their suffix and are not read")
    items, clashes = unique_keys(items)  # only paths differing in characters safe_key replaces
    rejected += clashes
    return Dataset("image", items, rejected, len(items) + len(rejected), list(names), [], notes, [])


# -- custom caption sets ------------------------------------------------------------------------------------


def caption_dataset(
    videos: Path, entries: list[tuple[str, str, str]], sources: list[Path], notes: list[str]
) -> Dataset:
    """(where, path, caption) entries -> one item per path with its non-empty captions in listed order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for where, path, caption in entries:
        groups.setdefault(os.path.normpath(path) if path else "", []).append((where, caption))
    items: list[Item] = []
    rejected: list[Rejected] = []
    for index, (relative, listed) in enumerate(groups.items()):
        where = ", ".join(w for w, _ in listed)
        if not relative:
            rejected.append(Rejected(where, "annotation", "no path"))
            continue
        texts = [caption.strip() for _, caption in listed if caption.strip()]
        if not texts:
            rejected.append(Rejected(relative, "caption", f"no caption ({where})"))
            continue
        path, size = stat_file(videos, relative)
        if path is None:
            rejected.append(Rejected(relative, "missing", size))
            continue
        key = safe_key(f"{index:08d}_{Path(relative).stem}")
        items.append(Item(key, relative, path, size, captions=texts))
    return Dataset("video", items, rejected, len(groups), None, [], notes, sources)


def read_captions_csv(videos: Path, path: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """``path,caption`` rows (header optional; several rows of one path = several captions; a caption
    with unquoted commas is read whole)."""
    notes: list[str] = []
    rows = table_rows(path, videos, False, notes)
    return caption_dataset(videos, [(f"line {line}", p, c) for line, p, c in rows], [path], notes)


def read_captions_json(videos: Path, path: Path, split: str | None, classes: list[str] | None) -> Dataset:
    """``{"path": "caption" | ["caption", ...], ...}`` or ``[{"path": ..., "caption" | "captions": ...}]``
    (``video`` is read for ``path``; several entries of one path add captions)."""
    data = read_json(path)
    entries: list[tuple[str, str, str]] = []
    pairs = list(data.items()) if isinstance(data, dict) else None
    if pairs is None:
        if not isinstance(data, list):
            raise FormatError(f"{path} is neither an object of path -> captions nor a list of entries")
        pairs = []
        for position, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise FormatError(f"{path}: entry {position} is not an object")
            pairs.append(
                (entry.get("path", entry.get("video", "")), entry.get("captions", entry.get("caption", [])))
            )
    for position, (video, captions) in enumerate(pairs):
        texts = [captions] if isinstance(captions, str) else captions
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise FormatError(f"{path}: the captions of {video!r} are not strings")
        where = f"entry {position}"
        entries += [(where, str(video).strip(), text) for text in texts] or [(where, str(video).strip(), "")]
    return caption_dataset(videos, entries, [path], [])


FORMATS: dict[str, Format] = {
    "csv": Format(read_csv, "file", None),
    "ssv2": Format(
        read_ssv2, "folder", ("train", "validation", "test"), split_required=True, own_classes=True
    ),
    "kinetics": Format(read_kinetics, "file", ()),
    "msrvtt": Format(read_msrvtt, "folder", ("train", "validation", "test"), split_required=True),
    "vatex": Format(read_vatex, "file", None),
    "imagenet": Format(read_imagenet, None, None, kind="image"),
    "captions-csv": Format(read_captions_csv, "file", None),
    "captions-json": Format(read_captions_json, "file", None),
}
FORMAT_ALIASES = {"k400": "kinetics", "k600": "kinetics", "k700": "kinetics", "sthv2": "ssv2"}
