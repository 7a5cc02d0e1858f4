"""Fit BEVT's k-means tokenizer: a codebook of a frozen ViT block's patch features on video frames.

    python -m launch.fit_tokenizer --shards "shards/synthetic/train-{000000..000007}.tar" --backbone demo \\
        [--pretrained PATH] [--layer -1] [--codes 64] [--clips 400] [--frames 4] [--iters 30] [--seed 0] \\
        --out runs/tokenizer/kmeans.pt

Reads up to ``--clips`` clips once (centre crop, ``--frames`` frames each, at the backbone's image size), runs
the frozen ViT up to block ``--layer`` (-1: the last), fits ``--codes`` spherical k-means centroids to the
patch tokens and writes the codebook file ``bevt.tokenizer.path`` takes (``kind=kmeans``); without
``--pretrained`` the backbone's random weights go into the file too. Prints one summary line: clips, feature
vectors, codes used, the code histogram's entropy in bits (log2 codes when every code is used equally; far
below it: a collapsed codebook), the mean cosine to the nearest centroid, seconds.

Exit codes: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace

import torch

from data.shards import DataConfig, DataError, Unlabelled, build_loader, expand_shards
from models.backbone import BackboneConfig, build_backbone
from models.tokenizers import fit_kmeans, nearest_centroid, save_codebook
from trainer.safe_load import UnsafeFileError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--shards", required=True, help="video shards: a path, brace pattern, or '::'-joined")
    parser.add_argument("--backbone", default="demo", help="named backbone shape (models.backbone.SIZES)")
    parser.add_argument("--pretrained", help="its local weights (as backbone.pretrained)")
    parser.add_argument("--layer", type=int, default=-1, help="block whose patch tokens are clustered")
    parser.add_argument("--codes", type=int, default=64, help="codebook size K")
    parser.add_argument("--clips", type=int, default=400, help="clips read (at most)")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip")
    parser.add_argument("--iters", type=int, default=30, help="Lloyd iterations (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="clips per forward")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", required=True, help="codebook file to write")
    args = parser.parse_args(argv)
    for name in ("codes", "clips", "frames", "iters", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


@torch.no_grad()
def collect_features(args: argparse.Namespace, backbone, device: torch.device) -> tuple[torch.Tensor, int]:
    """Patch tokens of the tapped block for up to ``args.clips`` clips -> ((N, D) features, clips read)."""
    from data.video import normalize

    data = DataConfig(
        train_shards=args.shards,
        eval_shards=args.shards,
        num_frames=args.frames,
        batch_size=args.batch,
        eval_batch_size=args.batch,
        num_workers=args.workers,
    )
    loader = build_loader(
        data, backbone.image_size, Unlabelled(), train=False, seed=args.seed, rank=0, world_size=1
    )
    features, clips = [], 0
    for batch in loader:
        frames = batch["frames"]  # (B, views, T, 3, S, S) uint8, or None
        if frames is None:
            continue
        frames = frames[: args.clips - clips]
        clips += len(frames)
        pixels = normalize(frames.to(device).flatten(0, 2), backbone.dtype)  # (B * views * T, 3, S, S)
        for hidden in backbone(pixels):  # one tap: the chosen block
            tokens = hidden[:, 1:]  # (frames, N, D) patch tokens
        features.append(tokens.flatten(0, 1).float())
        if clips >= args.clips:
            break
    if not features:
        raise ValueError(f"--shards: no clip of at least {args.frames} frames in {args.shards!r}")
    return torch.cat(features), clips


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        expand_shards(args.shards)  # missing shards fail here, before a large backbone is built
        cfg = BackboneConfig(name=args.backbone, pretrained=args.pretrained)
        torch.manual_seed(args.seed)  # random weights (no --pretrained) are the seed's too
        backbone = build_backbone(cfg).to(device)  # its depth may come from a pretrained directory
        depth = backbone.num_layers
        layer = args.layer + depth if args.layer < 0 else args.layer
        if not 0 <= layer < depth:
            raise ValueError(f"--layer: {args.layer} is out of range for the {depth}-block {args.backbone}")
        cfg = replace(cfg, tap_layers=[layer])
        backbone.taps = [layer]  # run the blocks up to the chosen one, and no further
        features, clips = collect_features(args, backbone, device)  # (N, D)
        centroids = fit_kmeans(features, args.codes, args.iters, args.seed)  # (K, D)
    except (ValueError, FileNotFoundError, DataError, UnsafeFileError) as exc:  # --pretrained refused
        print(f"error: {exc}", file=sys.stderr)
        return 2
    codes, similarity = nearest_centroid(features, centroids)
    counts = torch.bincount(codes, minlength=args.codes).double()
    share = counts[counts > 0] / counts.sum()
    entropy = float(-(share * share.log2()).sum())
    # Random weights cannot be rebuilt: store them with the codebook so its codes keep their meaning.
    weights = None if args.pretrained else dict(backbone.named_parameters())
    save_codebook(
        args.out, centroids, cfg, layer, weights, source=args.shards, samples=clips, features=len(features)
    )
    used = int((counts > 0).sum())
    print(
        f"fit_tokenizer: {clips} clips, {len(features)} feature vectors ({features.shape[1]}-d, "
        f"block {layer}), {used}/{args.codes} codes used, entropy {entropy:.2f} bits "
        f"(max {math.log2(args.codes):.2f}), mean cosine to centroid {float(similarity.mean()):.3f}, "
        f"{time.perf_counter() - start:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
