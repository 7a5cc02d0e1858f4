"""Train: a side network beside a frozen image backbone, a Video Swin recognizer, or BEVT pretraining.

    python -m launch.train [--config configs/NAME.yaml] [key=value ...]
    deepspeed --num_gpus N --module launch.train --config configs/NAME.yaml [key=value ...]

Without a config file the embedded defaults run: the CPU demo on the synthetic motion shards.

Exit codes: 0 done, 2 configuration, input or checkpoint error (or a diverged run), 3 stopped by
SIGTERM/SIGUSR1 after saving a checkpoint (requeue the job: it resumes from that checkpoint), 130 Ctrl-C,
1 anything unexpected (its traceback in run_dir/crash-rankN.log). Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file overriding the defaults")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # options may follow overrides (the SLURM templates do that)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.bevt import BEVTTrainer
    from trainer.distributed import destroy, init_distributed
    from trainer.failures import report
    from trainer.preemption import PREEMPTED_EXIT_CODE
    from trainer.trainer import Trainer

    trainer = rank = None
    try:
        dist = init_distributed()
        rank = dist.rank
        trainer = (BEVTTrainer if cfg.task == "bevt" else Trainer)(cfg, dist)
        code = PREEMPTED_EXIT_CODE if "preempted" in trainer.train() else 0
    except BaseException as exc:  # errors, Ctrl-C, a loader worker's death: one line and an exit code
        return report(exc, cfg.run_dir, rank or 0)
    finally:
        if trainer is not None:
            trainer.close()
    destroy()
    return code


if __name__ == "__main__":
    code = main()
    from trainer.failures import finish

    finish(code)
