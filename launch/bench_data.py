"""Data-pipeline throughput: clips per second from shards of real encoded video.

    python -m launch.bench_data [--shards 'DIR/train-{000000..000003}.tar'] [--frames 8 16] [--workers 1 4]
                                [--size 224] [--clips 256] [--json bench_data.json]

For each frame count it measures, on the same videos and the same sampled frames (best of ``--repeats``
interleaved runs):
- ``pipeline``: the training loader (shard read, decode, TSN sampling, random resized crop, resize) with
  ``--workers`` worker processes, decoding at full size, and with decode-time resizing to the output size
  (``data.decode_size``);
- ``decord``: a bare decord decode of the same frames straight to the output size, in this process, and
  ``pyav``: PyAV decoding up to the last sampled frame, scaling each sampled frame to the output size.
Without ``--shards`` it first writes synthetic H.264 shards (``--synthetic``: 64 videos of 256 px and 64
frames) to a temporary directory: moving shapes on a flat background, or with ``--texture`` a camera
drifting over and zooming into a random textured scene at 30 fps (``data.synthetic.textured_clip``): detail at
every scale and sub-pixel motion, far costlier to decode than the flat shapes.

``--short-side S`` also re-encodes the same videos to shorter side S exactly as ``launch.make_shards
--short-side S`` does (``data.packing.transcode``) and measures the pipeline on those shards too:
``short{S}_pipeline_wN`` and its ratio to the originals, ``short{S}_over_original_wN``.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data.decode import VIDEO_EXTENSIONS
from data.shards import DataConfig, SkipSample, build_loader, expand_shards, sample_rng, video_bytes
from data.video import open_video, read_frames, segment_indices


def videos_in(urls: list[str]) -> list[tuple[str, bytes]]:
    """(key, video bytes) of every sample with a video, read as the training pipeline reads shards."""
    import webdataset as wds

    out = []
    for url in urls:
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            try:
                out.append((sample["__key__"], video_bytes(sample)))
            except SkipSample:
                continue
    return out


def bench_pipeline(spec: str, frames: int, size: int, workers: int, clips: int, decode_resize: bool) -> float:
    batch = 8
    cfg = DataConfig(
        train_shards=spec, num_frames=frames, batch_size=batch, num_workers=workers, shuffle_buffer=0,
        decode_size=[size, size] if decode_resize else [],
    )  # fmt: skip
    loader = iter(build_loader(cfg, size, 1 << 30, train=True, seed=0, rank=0, world_size=1))
    next(loader)  # workers started, first batch out
    start, done = time.perf_counter(), 0
    while done < clips:
        done += len(next(loader)["keys"])
    return done / (time.perf_counter() - start)


def _indices(key: str, total: int, frames: int) -> np.ndarray:
    return segment_indices(total, frames, rng=sample_rng(0, 0, key))  # as the training pipeline samples


def bench_decord(videos: list[tuple[str, bytes]], frames: int, size: int, clips: int) -> float:
    start = time.perf_counter()
    for key, video in itertools.islice(itertools.cycle(videos), clips):
        reader = open_video(video, 1, (size, size))
        read_frames(reader, _indices(key, len(reader), frames))
    return clips / (time.perf_counter() - start)


def bench_pyav(videos: list[tuple[str, bytes]], frames: int, size: int, clips: int) -> float:
    import av

    start = time.perf_counter()
    for key, video in itertools.islice(itertools.cycle(videos), clips):
        with av.open(io.BytesIO(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            wanted = set(_indices(key, stream.frames, frames).tolist())
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frame.to_ndarray(format="rgb24", width=size, height=size)
                if i >= max(wanted):
                    break
    return clips / (time.perf_counter() - start)


def synthetic_shards(
    out: Path, videos: int = 64, size: int = 256, frames: int = 64, texture: bool = False
) -> str:
    from data.synthetic import encode_mp4, synthetic_samples, textured_clip
    from data.writer import write_shards

    if texture:
        rng = np.random.default_rng(0)
        samples = (
            (f"bench{i:06d}", "mp4", encode_mp4(textured_clip(rng, size, size, frames), fps=30), i % 8, None)
            for i in range(videos)
        )
    else:
        samples = synthetic_samples(videos, 0, size=size, frames=frames, prefix="bench")
    written = write_shards(samples, out, "bench", max_count=max(1, videos // 4))
    return "::".join(str(path) for path in written)


def short_side_shards(urls: list[str], out: Path, short_side: int, crf: int = 23) -> str:
    """The shards at ``urls`` with every video re-encoded as ``make_shards --short-side`` re-encodes it."""
    import webdataset as wds

    from data.packing import transcode
    from data.writer import ShardTar

    written = []
    for number, url in enumerate(urls):
        shard = ShardTar(out / f"short-{number:06d}.tar")
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            video = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            if video is None:
                continue
            members = {name: data for name, data in sample.items() if not name.startswith("__")}
            try:
                members["mp4"] = transcode(members.pop(video), short_side, None, crf)[0]
            except Exception as exc:  # PyAV cannot re-encode it: said, and left out
                print(f"note: {sample['__key__']} not re-encoded ({exc}); left out", file=sys.stderr)
                continue
            shard.add(sample["__key__"], members)
        shard.close()
        written.append(shard.path)
    return "::".join(str(path) for path in written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", help="shard pattern (default: synthetic H.264 shards)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=224, help="output frame size")
    parser.add_argument("--clips", type=int, default=192, help="clips timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (the best is kept)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument(
        "--short-side", type=int, help="also measure the videos re-encoded to this shorter side (even)"
    )
    parser.add_argument(
        "--texture", action="store_true", help="synthetic videos: a moving camera over a textured scene"
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        nargs=3,
        default=[64, 256, 64],
        metavar=("VIDEOS", "SIZE", "FRAMES"),
        help="the synthetic shards written without --shards",
    )
    args = parser.parse_args(argv)
    if args.short_side is not None and (args.short_side < 2 or args.short_side % 2):
        parser.error(f"--short-side: {args.short_side} must be even and positive (H.264 in yuv420p)")

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or synthetic_shards(Path(tmp), *args.synthetic, texture=args.texture)
        videos = videos_in(expand_shards(spec))
        if not videos:
            print(f"no videos in {spec}", file=sys.stderr)
            return 2
        short = f"short{args.short_side}"
        if args.short_side:
            (Path(tmp) / short).mkdir()
            short_spec = short_side_shards(expand_shards(spec), Path(tmp) / short, args.short_side)
        records = []
        for frames in args.frames:
            row = {"frames": frames, "size": args.size, "videos": len(videos)}
            measures = {
                "decord": lambda f=frames: bench_decord(videos, f, args.size, args.clips),
                "pyav": lambda f=frames: bench_pyav(videos, f, args.size, args.clips),
            }
            for workers, resize in itertools.product(args.workers, (False, True)):
                name = f"pipeline_w{workers}" + ("_decode_resize" if resize else "")
                measures[name] = functools.partial(
                    bench_pipeline, spec, frames, args.size, workers, args.clips, resize
                )
            for workers in args.workers if args.short_side else ():
                measures[f"{short}_pipeline_w{workers}"] = functools.partial(
                    bench_pipeline, short_spec, frames, args.size, workers, args.clips, False
                )
            for _ in range(args.repeats):  # interleaved, best of each: machine noise only slows runs down
                for name, measure in measures.items():
                    row[name] = max(row.get(name, 0.0), measure())
            if "pipeline_w1" in row:  # the acceptance figure: one worker against bare decord
                for name in ("pipeline_w1", "pipeline_w1_decode_resize"):
                    row[f"{name}_over_decord"] = row[name] / row["decord"]
            for workers in args.workers if args.short_side else ():
                name = f"pipeline_w{workers}"
                row[f"{short}_over_original_w{workers}"] = row[f"{short}_{name}"] / row[name]
            records.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    print(table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    return 0


def table(records: list[dict]) -> str:
    columns = [k for k in records[0] if k not in ("frames", "size", "videos")]
    lines = ["| frames | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['frames']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + " |")
    return "clips/s (and ratios)\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
