"""Shard-packing throughput: one folder of clips packed by ``launch.make_shards`` with each --workers count.

    python -m launch.bench_shards [--clips 200] [--size 320x240] [--seconds 6] [--fps 30] [--workers 1 2]
                                  [--repeats 2] [--short-side S] [--dir DIR] [--json bench_shards.json]

Writes ``--clips`` H.264 clips of a moving camera over a textured scene (``data.synthetic.textured_clip``)
and their ``path,label`` CSV under ``--dir`` (kept there and reused by later runs; default a temporary
folder), then runs ``python -m launch.make_shards`` on them once per --workers count, interleaved
``--repeats`` times, timing each whole command as its user waits for it (start-up included). Every run must
write the same shards (sha256 in manifest.json). Prints the wall seconds of each run, and each count's best
against the first count's best.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RUN_TIMEOUT_S = 3600  # one make_shards run; a hung run fails the benchmark instead of holding it


def write_clip(task: tuple[Path, int, int, int, int, int]) -> None:
    from data.synthetic import encode_mp4, textured_clip

    path, seed, height, width, frames, fps = task
    clip = textured_clip(np.random.default_rng(seed), height, width, frames)
    path.write_bytes(encode_mp4(clip, fps=fps))


def write_clips(folder: Path, clips: int, height: int, width: int, frames: int, fps: int) -> Path:
    """The clips and labels.csv under ``folder`` (clips already there are kept). -> the CSV."""
    videos = folder / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    names = [f"clip{i:05d}_{width}x{height}_{frames}f.mp4" for i in range(clips)]
    missing = [(videos / name, i, height, width, frames, fps) for i, name in enumerate(names)]
    missing = [task for task in missing if not task[0].is_file()]
    if missing:
        print(f"writing {len(missing)} clips of {width}x{height}, {frames} frames ...", file=sys.stderr)
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(write_clip, missing, chunksize=4))
    labels = folder / f"labels_{width}x{height}_{frames}f_{clips}.csv"
    labels.write_text("".join(f"{name},{i % 8}\n" for i, name in enumerate(names)))
    return labels


def pack(folder: Path, labels: Path, out: Path, workers: int, short_side: int | None) -> tuple[float, list]:
    """One make_shards run into an emptied ``out`` (a kept pack would be resumed, not written). -> (wall
    seconds, the shards' sha256 in order)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "launch.make_shards", "--videos", str(folder / "videos"),
               "--labels", str(labels), "--out", str(out), "--workers", str(workers)]  # fmt: skip
    if short_side:
        command += ["--short-side", str(short_side)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"make_shards --workers {workers} failed:\n{result.stderr[-2000:]}")
    if "kept from an earlier run" in result.stdout:  # a resumed pack would time almost nothing
        raise SystemExit(f"make_shards --workers {workers} resumed an earlier pack in {out}")
    manifest = json.loads((out / "manifest.json").read_text())
    return seconds, [shard["sha256"] for shard in manifest["shards"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the clips (even)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per count (the best is compared)")
    parser.add_argument("--short-side", type=int, help="pass --short-side to make_shards (re-encoding)")
    parser.add_argument("--dir", type=Path, help="where the clips are written and kept (default: temporary)")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.lower().split("x"))
    frames = round(args.seconds * args.fps)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        labels = write_clips(folder, args.clips, height, width, frames, args.fps)
        runs: dict[int, list[float]] = {workers: [] for workers in args.workers}
        shards = set()
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every count alike
            for workers in args.workers:
                seconds, digests = pack(folder, labels, Path(tmp) / f"out{workers}", workers, args.short_side)
                runs[workers].append(seconds)
                shards.add(tuple(digests))
                print(f"--workers {workers}: {seconds:.2f} s", file=sys.stderr)
    if len(shards) != 1:
        print("error: the runs wrote different shards", file=sys.stderr)
        return 1
    base = min(runs[args.workers[0]])
    record = {
        "clips": args.clips, "size": args.size, "frames": frames, "fps": args.fps,
        "short_side": args.short_side, "shards": len(shards.pop()), "wall_s": runs,
        "speedup": {workers: base / min(seconds) for workers, seconds in runs.items()},
    }  # fmt: skip
    lines = ["| --workers | wall s (each run) | best vs first |", "|---|---|---|"]
    for workers, seconds in runs.items():
        each = ", ".join(f"{value:.2f}" for value in seconds)
        lines.append(f"| {workers} | {each} | {record['speedup'][workers]:.2f} x |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
