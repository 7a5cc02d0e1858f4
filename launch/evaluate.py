"""Evaluate a trained model on data.eval_shards, as the training run's final evaluation does.

    python -m launch.evaluate --config configs/NAME.yaml [--checkpoint PATH] [--out DIR] [key=value ...]
    deepspeed --num_gpus N --module launch.evaluate --config configs/NAME.yaml [...]

Weights: the newest complete checkpoint of run_dir, or --checkpoint (a checkpoint folder, or a run directory
and its newest complete one); with neither, side.init_from (an imported Side4Video release). Only the model
weights are read; no optimizer is built. Views: data.eval_clips x data.eval_crops; eval.temporal_check adds
the frames-shuffled and single-frame scores.

Writes into --out (default run_dir/evaluation, beside the training run's own eval.json): eval.json;
recognition also predictions.jsonl, confusion.npy and confusion.png (class names from a classes.txt beside
the evaluation shards, one per line); retrieval also caption_ranks.jsonl.

Exit codes: 0 done, 2 configuration, input or checkpoint error, 130 Ctrl-C, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file overriding the defaults (the run's own config)")
    parser.add_argument("--checkpoint", help="a checkpoint folder or a run directory (default: run_dir)")
    parser.add_argument("--out", help="output folder (default: run_dir/evaluation)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.eval_clips=4")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.distributed import destroy, init_distributed
    from trainer.evaluator import Evaluator
    from trainer.failures import report

    out = Path(args.out or Path(cfg.run_dir) / "evaluation")
    rank = None
    try:
        dist = init_distributed()
        rank = dist.rank
        evaluator = Evaluator(cfg, dist, args.checkpoint)
        result = evaluator.evaluate(out)
    except BaseException as exc:  # errors, Ctrl-C, a loader worker's death: one line and an exit code
        return report(exc, str(out) if out.is_dir() else None, rank or 0)
    if dist.is_main:
        shown = ", ".join(
            f"{k} {result[k]:.4f}" for k in (*evaluator.task.headline, "mean_class_acc") if k in result
        )
        print(f"{shown} over {result['num_videos']} videos ({evaluator.weights}); written to {out}")
    destroy()
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.failures import finish

    finish(code)
