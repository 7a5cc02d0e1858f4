"""Generate the synthetic motion dataset as WebDataset shards.

python -m launch.make_synthetic --out shards/synthetic [--train 1600 --test 200]
                                [--train-shards 8 --test-shards 2]
python -m launch.make_synthetic --captions --out shards/retrieval ...   # retrieval set + OUT/tokenizer
python -m launch.make_synthetic --images --out shards/images [--train 2000 --test 200]   # shape images
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from data.captions import write_bpe_tokenizer
from data.synthetic import (
    MOTIONS,
    SHAPES,
    caption_corpus,
    retrieval_samples,
    synthetic_images,
    synthetic_samples,
)
from data.writer import write_shards

KINDS = ("motion", "captions", "images")


def _render(args: tuple[str, int, int, int, int, str, int]) -> list:
    kind, count, seed, size, frames, prefix, start = args
    if kind == "images":
        return list(synthetic_images(count, seed, size, prefix, start))
    samples = retrieval_samples if kind == "captions" else synthetic_samples
    return list(samples(count, seed, size, frames, prefix, start))


def make_split(
    out: Path,
    name: str,
    count: int,
    shards: int,
    seed: int,
    size: int,
    frames: int,
    jobs: int,
    kind: str = "motion",
) -> None:
    """Render ``count`` samples of ``kind`` ("motion" clips, "captions" clips, or "images") into ``shards``
    shards ``OUT/NAME-%06d.tar``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    per_shard = math.ceil(count / shards)
    # Rendering is CPU-bound: one job per shard's worth of samples, written in order.
    chunks = [
        (kind, min(per_shard, count - s), seed * 1000 + i, size, frames, name, s)
        for i, s in enumerate(range(0, count, per_shard))
    ]
    with ProcessPoolExecutor(jobs) as pool:
        samples = (sample for chunk in pool.map(_render, chunks) for sample in chunk)
        written = write_shards(samples, out, prefix=name, max_count=per_shard)
    print(f"{name}: {count} {'images' if kind == 'images' else 'clips'} in {len(written)} shards under {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="shards/synthetic")
    parser.add_argument("--train", type=int, default=1600, help="training samples")
    parser.add_argument("--test", type=int, default=200, help="test samples")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--test-shards", type=int, default=2)
    parser.add_argument("--size", type=int, default=112, help="frame height and width (even for clips)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="rendering processes")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--captions",
        action="store_true",
        help="the retrieval set: named colours and two speeds, 3 captions per clip in KEY.json, and a "
        "CLIP-style BPE tokenizer learned from the caption vocabulary in OUT/tokenizer",
    )
    kind.add_argument(
        "--images",
        action="store_true",
        help="PNG images (one frame of a clip) labelled by the moving shape's kind, for BEVT's image stream",
    )
    args = parser.parse_args(argv)
    kind = "images" if args.images else "captions" if args.captions else "motion"
    if args.size % 2 and kind != "images":
        parser.error("--size must be even (H.264 with yuv420p)")
    out = Path(args.out)
    common = (args.size, args.frames, args.jobs, kind)
    make_split(out, "train", args.train, args.train_shards, args.seed, *common)
    make_split(out, "test", args.test, args.test_shards, args.seed + 1, *common)
    if args.captions:
        print(f"tokenizer: {write_bpe_tokenizer(caption_corpus(), out / 'tokenizer')}")
    classes = SHAPES if args.images else MOTIONS
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes))  # names for launch.evaluate
    print(f"classes ({len(classes)}, in {out / 'classes.txt'}): {', '.join(classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
