"""Writing samples into WebDataset tar shards, reproducibly: the same samples always give the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path


def safe_key(name: str) -> str:
    """A sample key WebDataset groups correctly: no dots (it splits at the first one), no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def sample_members(extension: str, data: bytes, label: object = None, meta: dict | None = None) -> dict:
    """The tar members of one sample: ``{extension: data}``, ``cls`` (when ``label`` is not None) and
    ``json`` (when ``meta`` is not None)."""
    members = {extension: data}
    if label is not None:
        members["cls"] = str(label).encode()
    if meta is not None:
        members["json"] = json.dumps(meta).encode()
    return members


class _HashingFile:
    """A write-only file that also feeds what is written into a hash (tarfile needs write and tell)."""

    def __init__(self, handle, digest):
        self.handle, self.digest = handle, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.handle.tell()


class ShardTar:
    """One tar shard being written.

    Every member header is fixed (mtime 0, owner root, mode 0444), so the bytes depend on the samples only:
    resumed and parallel packing rely on it to give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0  # samples added
        self._digest = hashlib.sha256()
        self._handle = open(self.path, "wb")  # noqa: SIM115  (closed in close/discard)
        self._tar = tarfile.open(  # noqa: SIM115  (the same)
            fileobj=_HashingFile(self._handle, self._digest), mode="w", format=tarfile.PAX_FORMAT
        )

    @property
    def size(self) -> int:
        """Bytes written so far (headers and padding included; the end-of-archive blocks not yet)."""
        return self._tar.offset

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions to bytes, stored as ``KEY.EXT``."""
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self, sync: bool = False) -> tuple[int, str]:
        """Finish the archive; with ``sync`` the bytes are on disk before this returns. -> (bytes, sha256)."""
        self._tar.close()  # the end-of-archive blocks; the file itself stays open (it was passed in)
        self._handle.flush()
        if sync:
            os.fsync(self._handle.fileno())
        size = self._handle.tell()
        self._handle.close()
        return size, self._digest.hexdigest()

    def discard(self) -> None:
        """Stop writing and delete the unfinished file."""
        self._handle.close()
        self.path.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[tuple[str, str, bytes, object, dict | None]],
    out_dir: str | Path,
    prefix: str = "shard",
    max_bytes: int | None = None,
    max_count: int | None = None,
) -> list[Path]:
    """Write (key, container extension, video bytes, label, metadata) samples to ``out_dir/prefix-%06d.tar``.

    A new shard starts once the current one holds ``max_count`` samples or ``max_bytes`` bytes. A label of
    None writes no ``KEY.cls``, metadata of None no ``KEY.json``. Returns the shard paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_bytes, max_count = max_bytes or 3 << 30, max_count or 1 << 30
    written: list[Path] = []
    shard: ShardTar | None = None
    for key, extension, data, label, meta in samples:
        if shard is not None and (shard.count >= max_count or shard.size >= max_bytes):
            shard.close()
            shard = None
        if shard is None:
            shard = ShardTar(out / f"{prefix}-{len(written):06d}.tar")
            written.append(shard.path)
        shard.add(safe_key(key), sample_members(extension, data, label, meta))
    if shard is not None:
        shard.close()
    return written
