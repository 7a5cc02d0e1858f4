"""Train: a side network beside a frozen image backbone, a Video Swin recognizer, or BEVT pretraining.

    python -m launch.train [--config configs/NAME.yaml] [key=value ...]
    deepspeed --num_gpus N --module launch.train --config configs/NAME.yaml [key=value ...]

Without a config file the embedded defaults run: the CPU demo on the synthetic motion shards.

Exit codes: 0 done, 2 configuration or input error, 3 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(requeue the job: it resumes from that checkpoint).
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

    from data.shards import DataError
    from trainer.bevt import BEVTTrainer
    from trainer.distributed import destroy, init_distributed
    from trainer.preemption import PREEMPTED_EXIT_CODE
    from trainer.trainer import Trainer

    dist = init_distributed()
    trainer = None
    try:
        trainer = (BEVTTrainer if cfg.task == "bevt" else Trainer)(cfg, dist)
        if "preempted" in trainer.train():
            return PREEMPTED_EXIT_CODE
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # from a loader worker, torch prefixes the worker's traceback: keep the message
        message = str(exc).strip().splitlines()[-1]
        print(f"data error: {message.split('DataError: ', 1)[-1]}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        destroy()
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.distributed import exit_without_teardown  # (imports DeepSpeed: not before config errors)

    exit_without_teardown(code)
