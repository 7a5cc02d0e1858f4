"""Extract one pooled side-network feature per video (and optionally the frozen backbone's frame embeddings)
into WebDataset shards.

    python -m launch.extract_features --config configs/NAME.yaml [--checkpoint PATH] --shards SPEC --out DIR
        [--frozen] [--shard-size N] [key=value ...]
    deepspeed --num_gpus N --module launch.extract_features --config configs/NAME.yaml --shards SPEC --out DIR

Weights as for launch.evaluate. Videos are read as the evaluation reads them (every sample of SPEC once across
ranks and workers, data.eval_clips x data.eval_crops views) and need no label. Each rank writes
``DIR/features-rRRRRR-NNNNNN.tar`` with, per video:

- ``KEY.npy``: float32 (d,), what the classifier head reads (the side tokens after the side network's final
  norm, averaged over tokens and frames; for model video_swin the pooled stage 4), averaged over the views;
- ``KEY.frozen.npy`` (``--frozen``): float32 (views, T, W), the class token of the frozen backbone's last
  tapped block for every frame;
- ``KEY.cls``: the label, when the sample has a valid one.

``DIR/index.json`` lists every shard's keys, the members' shapes, the weights, and the samples skipped (by
kind, as training and evaluation count them). Exit codes as for launch.evaluate.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from data.shards import SkipSample, parse_label
from trainer.config import ConfigError, load_config


class OptionalLabel:
    """A feature is written for every video: its class index when it has a valid one, else None."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, sample: dict, rng) -> int | None:
        try:
            return parse_label(sample, self.num_classes)
        except SkipSample:
            return None

    def collate(self, targets: list[int | None]) -> dict:
        return {"labels": targets}


class FeatureShards:
    """This rank's output shards, ``max_count`` videos each."""

    def __init__(self, out: Path, rank: int, max_count: int):
        self.out, self.rank, self.max_count = out, rank, max_count
        self.shards: list[dict] = []  # {"path", "keys"} per shard written
        self._tar = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        from data.writer import ShardTar

        if self._tar is not None and self._tar.count >= self.max_count:
            self._tar.close()
            self._tar = None
        if self._tar is None:
            name = f"features-r{self.rank:05d}-{len(self.shards):06d}.tar"
            self._tar = ShardTar(self.out / name)
            self.shards.append({"path": name, "keys": []})
        self._tar.add(key, members)
        self.shards[-1]["keys"].append(key)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close(sync=True)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def extract(evaluator, out: Path, frozen: bool, shard_size: int) -> dict:
    """Write this rank's shards; return the index (the same on every rank)."""
    import torch

    from data.video import normalize
    from trainer.distributed import all_gather_objects
    from trainer.evaluate import lockstep, skip_counts, with_videos
    from trainer.tasks import Recognition

    cfg, dist, task = evaluator.cfg, evaluator.dist, evaluator.task
    if not isinstance(task, Recognition):
        raise ConfigError(
            f"task: {cfg.task}: features are extracted from recognition models (a classifier head)"
        )
    if frozen and task.frozen is None:
        raise ConfigError(f"--frozen: model {cfg.model} has no frozen backbone")
    loader = task.loader(train=False, target=OptionalLabel(cfg.num_classes))
    writer = FeatureShards(out, dist.rank, shard_size)
    slot_skips: dict[int, dict] = {}
    shapes: dict[str, list[int]] = {}
    with torch.no_grad():
        for batch, real in lockstep(with_videos(loader, slot_skips), task.filler(), dist.device):
            frames = batch["frames"]  # (B, V, T, 3, H, W) uint8
            videos, views = frames.shape[:2]
            clips = normalize(frames.to(dist.device, non_blocking=True).flatten(0, 1), evaluator.dtype)
            pooled, cls = task.features(evaluator.network, clips, frozen)  # (B*V, d), (B*V, T, W)
            if not real:
                continue
            pooled = pooled.float().view(videos, views, -1).mean(1).cpu().numpy()  # (B, d)
            if cls is not None:
                cls = cls.float().view(videos, views, *cls.shape[1:]).cpu().numpy()  # (B, V, T, W)
            for i, key in enumerate(batch["keys"]):
                members = {"npy": npy(pooled[i])}
                if cls is not None:
                    members["frozen.npy"] = npy(cls[i])
                if batch["labels"][i] is not None:
                    members["cls"] = str(batch["labels"][i]).encode()
                writer.add(key, members)
            if not shapes:
                shapes = {"npy": list(pooled.shape[1:])}
                shapes.update({"frozen.npy": list(cls.shape[1:])} if cls is not None else {})
    writer.close()
    gathered = all_gather_objects((writer.shards, slot_skips, shapes))
    shards = [shard for rank_shards, _, _ in gathered for shard in rank_shards]
    return {
        "num_videos": sum(len(shard["keys"]) for shard in shards),
        "shards": shards,
        "shapes": next((s for *_, s in gathered if s), {}),
        "views": cfg.data.views,
        "source_shards": cfg.data.eval_shards,
        "weights": evaluator.weights,
        **skip_counts(rank_skips for _, rank_skips, _ in gathered),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file overriding the defaults (the run's own config)")
    parser.add_argument("--checkpoint", help="a checkpoint folder or a run directory (default: run_dir)")
    parser.add_argument(
        "--shards", required=True, help="the videos: a shard path, brace pattern or '::' list"
    )
    parser.add_argument("--out", required=True, help="output folder for the feature shards and index.json")
    parser.add_argument("--frozen", action="store_true", help="also the frozen backbone's frame embeddings")
    parser.add_argument("--shard-size", type=int, default=10000, help="videos per output shard")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.eval_clips=2")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        cfg = replace(cfg, data=replace(cfg.data, eval_shards=args.shards))
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.distributed import destroy, init_distributed
    from trainer.evaluator import Evaluator
    from trainer.failures import report

    out = Path(args.out)
    rank = None
    try:
        dist = init_distributed()
        rank = dist.rank
        evaluator = Evaluator(cfg, dist, args.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        index = extract(evaluator, out, args.frozen, args.shard_size)
    except BaseException as exc:  # errors, Ctrl-C, a loader worker's death: one line and an exit code
        return report(exc, str(out) if out.is_dir() else None, rank or 0)
    if dist.is_main:
        (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        print(
            f"{index['num_videos']} videos in {len(index['shards'])} shards ({index['skipped']} skipped) "
            f"-> {out / 'index.json'}"
        )
    destroy()
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.failures import finish

    finish(code)
