"""Writing video samples into WebDataset tar shards."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds


def safe_key(name: str) -> str:
    """A sample key WebDataset groups correctly: no dots (it splits at the first one), no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def write_shards(
    samples: Iterable[tuple[str, str, bytes, int, dict]],
    out_dir: str | Path,
    prefix: str = "shard",
    max_bytes: int | None = None,
    max_count: int | None = None,
) -> list[Path]:
    """Write (key, container extension, video bytes, label, metadata) samples to ``out_dir/prefix-%06d.tar``.

    Returns the shard paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"maxsize": max_bytes or 3 << 30, "maxcount": max_count or 1 << 30}
    written: list[Path] = []
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), verbose=0, **limits) as sink:
        for key, extension, video, label, meta in samples:
            sink.write(
                {
                    "__key__": safe_key(key),
                    extension: video,
                    "cls": str(label).encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
            if sink.fname and (not written or str(written[-1]) != sink.fname):
                written.append(Path(sink.fname))
    return written
