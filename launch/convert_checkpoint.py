"""Extract a vision tower from a checkpoint into one safetensors file, reading one tensor at a time.

python -m launch.convert_checkpoint --src EVA02_CLIP_E_psz14_s4B.pt --out checkpoints/vit-e14.safetensors

Keys under --prefix (default "visual.") are kept with the prefix removed; everything else (the text tower,
the logit scale) is dropped. The source is memory-mapped, so host memory stays far below the model's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from models.weights import CheckpointReader


def convert(src: str | Path, out: str | Path, prefix: str = "visual.") -> int:
    reader = CheckpointReader(src)
    keys = [k for k in reader.names() if k.startswith(prefix)]
    if not keys:
        raise KeyError(f"{src}: no key starts with {prefix!r} (first keys: {reader.names()[:5]})")
    # Memory-mapped tensors: the writer pulls each from the page cache as it serialises it.
    tensors = {k[len(prefix) :]: reader.get(k).contiguous() for k in keys}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"source": Path(src).name, "prefix": prefix})
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", required=True, help=".pt/.pth/.bin/.safetensors checkpoint or transformers dir"
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--prefix", default="visual.", help="key prefix of the vision tower ('' keeps all keys)"
    )
    args = parser.parse_args(argv)
    try:
        count = convert(args.src, args.out, args.prefix)
    except (FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
