"""Generate the synthetic motion dataset as WebDataset shards.

python -m launch.make_synthetic --out shards/synthetic [--train 1600 --test 200]
                                [--train-shards 8 --test-shards 2]
python -m launch.make_synthetic --captions --out shards/retrieval ...   # retrieval set + OUT/tokenizer
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from data.captions import write_bpe_tokenizer
from data.synthetic import MOTIONS, caption_corpus, retrieval_samples, synthetic_samples
from data.writer import write_shards


def _render(args: tuple[bool, int, int, int, int, str, int]) -> list:
    captions, *rest = args
    return list((retrieval_samples if captions else synthetic_samples)(*rest))


def make_split(
    out: Path,
    name: str,
    count: int,
    shards: int,
    seed: int,
    size: int,
    frames: int,
    jobs: int,
    captions: bool = False,
) -> None:
    per_shard = math.ceil(count / shards)
    # Rendering is CPU-bound: one job per shard's worth of clips, written in order.
    chunks = [
        (captions, min(per_shard, count - s), seed * 1000 + i, size, frames, name, s)
        for i, s in enumerate(range(0, count, per_shard))
    ]
    with ProcessPoolExecutor(jobs) as pool:
        samples = (sample for chunk in pool.map(_render, chunks) for sample in chunk)
        written = write_shards(samples, out, prefix=name, max_count=per_shard)
    print(f"{name}: {count} clips in {len(written)} shards under {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="shards/synthetic")
    parser.add_argument("--train", type=int, default=1600, help="training clips")
    parser.add_argument("--test", type=int, default=200, help="test clips")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--test-shards", type=int, default=2)
    parser.add_argument("--size", type=int, default=112, help="frame height and width (even)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="rendering processes")
    parser.add_argument(
        "--captions",
        action="store_true",
        help="the retrieval set: named colours and two speeds, 3 captions per clip in KEY.json, and a "
        "CLIP-style BPE tokenizer learned from the caption vocabulary in OUT/tokenizer",
    )
    args = parser.parse_args(argv)
    if args.size % 2:
        parser.error("--size must be even (H.264 with yuv420p)")
    out = Path(args.out)
    common = (args.size, args.frames, args.jobs, args.captions)
    make_split(out, "train", args.train, args.train_shards, args.seed, *common)
    make_split(out, "test", args.test, args.test_shards, args.seed + 1, *common)
    if args.captions:
        print(f"tokenizer: {write_bpe_tokenizer(caption_corpus(), out / 'tokenizer')}")
    print(f"classes ({len(MOTIONS)}): {', '.join(MOTIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
