"""Opening and decoding video bytes with decord, and wording its failures for people. Free of torch: the
shard packer (launch.make_shards) starts in a fraction of a second and forks light workers.
"""

from __future__ import annotations

import io
import re

import numpy as np

# The container members the trainer reads as a sample's video (decord tells the container from the bytes).
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")


class VideoDecodeError(Exception):
    """The bytes could not be opened or decoded as a video."""


def open_video(data: bytes, threads: int = 1, size: tuple[int, int] | None = None):
    """A decord reader over in-memory bytes (decord copies them); ``size`` (height, width) makes decord scale
    frames while decoding, far cheaper than decoding at full size and resizing afterwards."""
    import decord  # imported lazily: its native library is loaded only in processes that decode

    if not data:
        raise VideoDecodeError("empty video bytes")
    height, width = size or (-1, -1)
    try:
        return decord.VideoReader(
            io.BytesIO(data), num_threads=threads, ctx=decord.cpu(0), width=width, height=height
        )
    except Exception as exc:  # decord raises DECORDError or RuntimeError for anything it cannot read
        raise VideoDecodeError(decode_failure(exc, data)) from exc


def read_frames(reader, indices: np.ndarray) -> np.ndarray:
    """Frames at ``indices`` as (T, H, W, 3) uint8."""
    try:
        return reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:
        raise VideoDecodeError(decode_failure(exc)) from exc


# decord's C++ messages start with a timestamp and the source line that raised them: noise to a reader.
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*?\) )?")
_CODEC_NAMES = {
    "av1": "AV1",
    "hevc": "HEVC (H.265)",
    "h264": "H.264",
    "vp8": "VP8",
    "vp9": "VP9",
    "mpeg4": "MPEG-4 part 2",
    "mpeg2video": "MPEG-2",
    "mpeg1video": "MPEG-1",
    "prores": "ProRes",
}


def decode_failure(exc: BaseException, data: bytes | None = None) -> str:
    """A decord failure worded for people: what is wrong with the file and, where known, what to do."""
    text = (str(exc).splitlines() or [""])[0]
    if "cannot find video stream" in text and data is not None:
        return _missing_stream(data)
    if text.startswith("Error reading"):  # decord's reader got no handle: ffmpeg recognised no container
        return "not a video container ffmpeg recognises (corrupt, truncated or not a video)"
    if "Invalid frame count" in text:
        return "no frames"
    if "broken metadata" in text:
        return "decord cannot count its frames (no duration or frame count); re-mux it into .mp4 or .mkv"
    if "Unable to handle EOF" in text:
        return "decord met corrupt or undecodable frames before the end; re-encode it (e.g. to H.264 in .mp4)"
    return _DECORD_PREFIX.sub("", text)[:200] or type(exc).__name__


def _missing_stream(data: bytes) -> str:
    """decord found no stream it can decode: ask PyAV whether there is no video stream or an unknown codec."""
    try:
        import av  # only on this failure path: decoding itself never needs PyAV

        with av.open(io.BytesIO(data)) as container:
            streams = list(container.streams)
            video = [stream for stream in streams if stream.type == "video"]
            if not video:
                kinds = sorted({stream.type for stream in streams})
                return "no video stream" + (f" (only {', '.join(kinds)})" if kinds else "")
            name = video[0].codec_context.codec.canonical_name
    except Exception:  # PyAV cannot tell either; say what decord saw
        return "no video stream decord can decode"
    codec = _CODEC_NAMES.get(name, name.upper())
    return f"{codec} is not supported by decord; re-encode it (e.g. to H.264)"
