"""Packing one item for a shard, in worker processes: read it, decode it as the trainer will, re-encode
it where asked (``transcode``), and hand back the bytes to store. Used by launch.make_shards and the data
benchmarks; free of torch for videos, so a pool of workers starts in a fraction of a second.
"""

from __future__ import annotations

import io
import multiprocessing
import platform
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np

from data.decode import VIDEO_EXTENSIONS, VideoDecodeError, open_video, read_frames
from data.formats import Item

# Suffixes of one container family the trainer knows under another name: .m4v/.3gp/.3g2 are ISO media files.
MEMBER_ALIASES = {"m4v": "mp4", "3gp": "mp4", "3g2": "mp4", "qt": "mov"}
FALLBACK_MEMBER = "mkv"  # the generic name for any other container; decord sniffs the real one
IMAGE_MEMBERS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # Pillow's format -> a member data.images reads
FALLBACK_IMAGE_MEMBER = "png"  # BMP, GIF, TIFF: stored unchanged; Pillow tells the format from the bytes
WINDOW_PER_WORKER = 4  # items in flight per worker: bounds the decoded bytes waiting in memory


class Undecodable(Exception):
    """An image that cannot be decoded as the trainer decodes it; the message says why."""


@dataclass(frozen=True)
class Job:
    """How items are packed; sent once to each worker process."""

    kind: str  # "video" or "image"
    short_side: int | None = None
    max_seconds: float | None = None
    crf: int = 23


_JOB = Job("video")


def init_worker(job: Job, pool: bool) -> None:
    global _JOB
    _JOB = job
    if pool:  # Ctrl-C reaches the whole process group: only the main process handles it, and stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker would inherit main's handler


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


@cache
def x264_options() -> dict[str, str]:
    """x264's AVX-512 code reads memory it never wrote for some frame sizes (observed with the x264 of PyAV
    18 at sides that are no multiple of 16: the same frames gave different bytes from run to run), which
    would break byte-identical resumed and parallel packs. Capped at AVX2 (as fast here) the output depends
    on the frames alone."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(
        next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "").split()
    )
    if any(flag.startswith("avx512") for flag in flags) and {"avx2", "bmi1", "bmi2", "fma", "abm"} <= flags:
        return {"x264-params": "asm=AVX2"}  # x264's cumulative name: everything up to AVX2, FMA3 and BMI2
    return {}


def even(value: float) -> int:
    return max(2, round(value / 2) * 2)


def transcode(data: bytes, short_side: int | None, max_seconds: float | None, crf: int) -> tuple[bytes, dict]:
    """Re-encode to H.264 mp4 (yuv420p, no audio, the source's frame rate), shorter side ``short_side``
    (never enlarged; sides rounded to even) and at most ``max_seconds`` long. -> (bytes, the source's size).

    One encoder thread: x264's frame threading makes the bytes depend on the thread count, and the worker
    processes give the parallelism; with ``x264_options`` the bytes depend on the frames alone.
    """
    import av  # only the re-encoding workers need PyAV

    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source:
        streams = [stream for stream in source.streams if stream.type == "video"]
        if not streams:
            raise VideoDecodeError("no video stream")
        video = streams[0]
        video.thread_type = "AUTO"
        rate = video.average_rate or video.guessed_rate or Fraction(30)
        height, width = video.codec_context.height, video.codec_context.width
        scale = min(1.0, short_side / min(height, width)) if short_side else 1.0
        size = (
            even(height * scale),
            even(width * scale),
        )  # (height, width); x264 in yuv420p needs even sides
        with av.open(out, mode="w", format="mp4") as sink:
            stream = sink.add_stream("libx264", rate=rate)
            stream.height, stream.width = size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(crf), "preset": "veryfast", **x264_options()}
            count, start = 0, None
            for frame in source.decode(video):
                seconds = frame.time if frame.time is not None else count / float(rate)
                start = seconds if start is None else start
                if max_seconds is not None and seconds - start >= max_seconds:
                    break
                frame = frame.reformat(width=size[1], height=size[0], format="yuv420p", interpolation="AREA")
                frame.pts, frame.time_base = count, 1 / Fraction(rate)  # even spacing at the average rate
                sink.mux(stream.encode(frame))
                count += 1
            if count == 0:
                raise VideoDecodeError("no frames")
            sink.mux(stream.encode())
    return out.getvalue(), {"height": height, "width": width}


def pack_video(data: bytes, name: str, job: Job) -> tuple[str, bytes, dict]:
    """(member extension, bytes, metadata) of one video as it will be stored; raises VideoDecodeError."""
    if job.short_side is None and job.max_seconds is None:
        return member_extension(name), data, probe(data)
    if job.short_side is None:  # only trimming: a short enough video is stored as it is
        meta = probe(data)
        if meta["fps"] > 0 and meta["frames"] <= job.max_seconds * meta["fps"]:
            return member_extension(name), data, meta
    try:
        encoded, source = transcode(data, job.short_side, job.max_seconds, job.crf)
    except Exception as exc:  # any PyAV failure is this video's, never the run's
        probe(data)  # decord's reason, worded for people, where decord cannot read it either
        raise VideoDecodeError(f"PyAV cannot re-encode it: {str(exc)[:200]}") from exc
    meta = probe(encoded)
    meta["reencoded_from"] = source
    return "mp4", encoded, meta


def pack_image(data: bytes) -> tuple[str, bytes, dict]:
    """(member extension, bytes, metadata) of one image, decoded whole as a check; raises Undecodable."""
    from PIL import Image, UnidentifiedImageError

    from data.images import DECODE_ERRORS, decode_image  # torch comes with it: only image packs load it
    from data.shards import SkipSample

    try:
        with Image.open(io.BytesIO(data)) as image:
            (width, height), kind = image.size, image.format
        decode_image(data, max(width, height))  # at full size: a truncated file fails here, not in training
    except UnidentifiedImageError as exc:
        raise Undecodable("not in an image format Pillow can read") from exc
    except DECODE_ERRORS as exc:
        raise Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    except SkipSample as exc:
        raise Undecodable(str(exc)) from exc
    return IMAGE_MEMBERS.get(kind, FALLBACK_IMAGE_MEMBER), data, {"width": width, "height": height}


def read_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file under --videos"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a video file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot be read: {exc.strerror or exc}"


def pack_item(task: tuple[int, str, str]) -> tuple[int, tuple]:
    """One item, in a worker -> (index, ("ok", extension, bytes, metadata) or ("rejected", kind, why))."""
    index, path, name = task
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        kind = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
        return index, ("rejected", kind, read_error(exc))
    try:
        if _JOB.kind == "image":
            return index, ("ok", *pack_image(data))
        return index, ("ok", *pack_video(data, name, _JOB))
    except (VideoDecodeError, Undecodable) as exc:
        return index, ("rejected", "undecodable", str(exc))
    except Exception as exc:  # a decoder's unexpected failure is this item's, never the whole pack's
        return index, ("rejected", "undecodable", f"{type(exc).__name__}: {str(exc)[:200]}")


START_METHOD: str | None = None  # None: chosen by pool_context; tests set "forkserver" to cover that path


def pool_context():
    """fork where it is safe: on Linux, with no other Python thread running (fork copies only the calling
    thread, so no other thread's lock can be left held in a worker), which starts workers with nothing to
    import. Otherwise the workers fork from a server process that imports this module and PyAV once."""
    methods = multiprocessing.get_all_start_methods()
    method = START_METHOD
    if method is None:
        alone = sys.platform == "linux" and threading.active_count() == 1
        method = (
            "fork" if alone and "fork" in methods else "forkserver" if "forkserver" in methods else "spawn"
        )
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["data.packing", "av"])
    return context


@contextmanager
def worker_pool(job: Job, workers: int):
    """The worker processes (None for ``workers`` = 1: items are packed in this process)."""
    if workers == 1:
        init_worker(job, pool=False)
        yield None
        return
    with pool_context().Pool(workers, initializer=init_worker, initargs=(job, True)) as pool:
        yield pool


def packed(items: list[Item], start: int, pool, workers: int) -> Iterator[tuple[int, tuple]]:
    """``pack_item`` of items[start:], in input order, on ``pool`` (None: in this process).

    Pool.imap would read the whole task list ahead and keep every result it gets ahead of the writer in
    memory; a semaphore released by the writer keeps WINDOW_PER_WORKER items per worker in flight.
    """
    tasks = ((index, str(items[index].path), items[index].name) for index in range(start, len(items)))
    if pool is None:
        yield from map(pack_item, tasks)
        return
    window, stop = threading.Semaphore(workers * WINDOW_PER_WORKER), threading.Event()

    def feed():
        for task in tasks:
            while not window.acquire(timeout=0.1):  # never block for good: terminate() joins this thread
                if stop.is_set():
                    return
            yield task

    try:
        for result in pool.imap(pack_item, feed()):
            window.release()
            yield result
    finally:
        stop.set()
