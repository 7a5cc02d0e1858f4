"""Predict the classes of video files with a trained model: each video's top-5 classes and probabilities.

    python -m launch.predict --config configs/NAME.yaml [--checkpoint PATH] [key=value ...] VIDEO [VIDEO ...]
    deepspeed --num_gpus N --module launch.predict --config configs/NAME.yaml VIDEO [...]

Weights as for launch.evaluate (run_dir's newest complete checkpoint, --checkpoint, or side.init_from).
Videos are decoded exactly as the evaluation decodes them (data.num_frames centred segments per clip,
data.eval_clips x data.eval_crops views, scores averaged). Class names: --classes FILE, else a classes.txt
beside data.eval_shards (one name per line, line N naming class N), else class indices. An argument that is
an existing file is a video; other KEY=VALUE arguments are config overrides.

Prints one line per video (``--json``: one JSON object per line, with "error" for a video that failed); a
video that cannot be read or decoded is one ``error:`` line on stderr naming it, and the others are still
predicted. Exit codes: 0 every video predicted, 2 some could not be (or a configuration, input or checkpoint
error), 130 Ctrl-C, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from trainer.config import ConfigError, load_config

OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file overriding the defaults (the run's own config)")
    parser.add_argument("--checkpoint", help="a checkpoint folder or a run directory (default: run_dir)")
    parser.add_argument(
        "--classes", help="class names, one per line (default: classes.txt beside the eval shards)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per video")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("inputs", nargs="+", metavar="VIDEO", help="video files (and key=value overrides)")
    args = parser.parse_intermixed_args(argv)
    overrides = [a for a in args.inputs if OVERRIDE.match(a) and not Path(a).is_file()]
    videos = [a for a in args.inputs if a not in overrides]
    if not videos:
        parser.error("no VIDEO given")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.distributed import destroy, init_distributed
    from trainer.evaluator import Evaluator
    from trainer.failures import report

    rank = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds predictions only (DeepSpeed prints)
            dist = init_distributed()
            rank = dist.rank
            evaluator = Evaluator(cfg, dist, args.checkpoint, check_data=False)
            names = evaluator.class_names(args.classes)
            results = predict_files(evaluator, videos)
    except BaseException as exc:  # errors, Ctrl-C: one line and an exit code
        return report(exc, None, rank or 0)
    if dist.is_main:
        for path, result in zip(videos, results, strict=True):
            show(path, result, names, args.json)
        sys.stdout.flush()
    destroy()
    return 2 if any(isinstance(result, str) for result in results) else 0


def show(path: str, result: list[tuple[int, float]] | str, names: list[str] | None, as_json: bool) -> None:
    """Print one video's top-5 (or, on stderr, why it has none)."""
    if isinstance(result, str):
        print(f"error: {path}: {result}", file=sys.stderr)
        if as_json:
            print(json.dumps({"file": path, "error": result}))
        return
    top5 = [{"class": c, "name": names[c] if names else str(c), "prob": round(p, 6)} for c, p in result]
    if as_json:
        print(json.dumps({"file": path, "top5": top5}))
    else:
        print(f"{path}: " + ", ".join(f"{entry['name']} {entry['prob']:.3f}" for entry in top5))


def predict_files(evaluator, paths: list[str]) -> list[list[tuple[int, float]] | str]:
    """Each file's top-5 (class, probability), or why it could not be predicted; the same on every rank.
    File i is decoded and scored by rank i % world size (every rank runs the same number of forwards)."""
    import numpy as np
    import torch

    from data.shards import SkipSample, Unlabelled, VideoClipDecoder
    from trainer.distributed import all_gather_objects
    from trainer.evaluate import gather_scores

    cfg, dist, task = evaluator.cfg, evaluator.dist, evaluator.task
    decoder = VideoClipDecoder(cfg.data, task.image_size, Unlabelled(), False, cfg.train.seed)
    failures: dict[int, str] = {}

    def batches() -> Iterator[dict]:
        clips, keys = [], []
        for index in range(dist.rank, len(paths), dist.world_size):
            try:
                data = Path(paths[index]).read_bytes()
                views, _ = decoder({"__key__": paths[index], "mp4": data}, 0)  # (V, T, 3, S, S) uint8
            except SkipSample as exc:
                failures[index] = f"cannot be used ({exc.kind}): {exc}"
                continue
            except OSError as exc:
                failures[index] = f"cannot be read: {exc.strerror or exc}"
                continue
            clips.append(views)
            keys.append(f"{index:09d}")  # sorted keys = file order
            if len(clips) == cfg.data.eval_batch_size:
                yield {"frames": torch.stack(clips), "keys": keys}
                clips, keys = [], []
        if clips:
            yield {"frames": torch.stack(clips), "keys": keys}

    def predict(clips):
        return task.forward(evaluator.network, clips)

    scores = gather_scores(predict, batches(), task.filler(), dist.device, evaluator.dtype)
    for rank_failures in all_gather_objects(failures):
        failures.update(rank_failures)
    top = np.argsort(-scores.probs, axis=1, kind="stable")[:, :5]
    predicted = {
        int(key): [(int(c), float(probs[c])) for c in classes]
        for key, classes, probs in zip(scores.keys, top, scores.probs, strict=True)
    }
    return [predicted.get(i, failures.get(i, "not predicted")) for i in range(len(paths))]


if __name__ == "__main__":
    code = main()
    from trainer.failures import finish

    finish(code)
