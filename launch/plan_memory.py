"""Predict a run's per-rank host and accelerator memory before queueing it; optionally measure it.

    python -m launch.plan_memory --config configs/NAME.yaml [--world-size N] [--cpu] [key=value ...]
    python -m launch.plan_memory --config ... --measure --json plan.json   # also measure 3 real steps here
    deepspeed --num_gpus 2 --module launch.plan_memory --config ... --measure  # measure on 2 ranks

The prediction needs no memory for the model (its step is simulated on the meta device), so it works for
ViT-E on a laptop. ``--measure`` builds the real trainer and tracks the tensor-level peak of three training
steps on random clips on every rank (the largest is reported), for comparison. Under a launcher the world
size is the launcher's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict

import torch

from trainer.config import ConfigError, load_config
from trainer.memory import PeakMemory, plan_memory


def measure(cfg, dist, steps: int = 3) -> int:
    """Tensor-level peak bytes of building the trainer and running ``steps`` training steps, the largest over
    ranks. The first step of a ZeRO-3 engine only traces the module order; prefetching starts with the second.
    """
    from trainer.distributed import all_gather_objects
    from trainer.trainer import Trainer

    size = cfg.data.num_frames, 3
    with PeakMemory() as tracker:
        trainer = Trainer(cfg, dist, check_data=False)  # random clips: no shards are read
        image = trainer.backbone.image_size
        batch = {
            "frames": torch.randint(0, 256, (cfg.data.train_clips, *size, image, image), dtype=torch.uint8),
            "labels": torch.randint(0, cfg.side.num_classes, (cfg.data.train_clips,)),
            "slot": 0,
            "state": {},
        }
        batches = iter([batch] * steps * cfg.train.grad_accum)
        for _ in range(steps):
            trainer.train_step(batches)
        trainer.close()
    return max(all_gather_objects(tracker.peak)) if dist.world_size > 1 else tracker.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument(
        "--world-size", type=int, help="ranks the run will use (default: the launcher's, or 1)"
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="plan for CPU ranks (one memory for all)")
    where.add_argument("--gpu", action="store_true", help="plan for GPU ranks (bf16), also without one here")
    parser.add_argument(
        "--measure", action="store_true", help="also measure 3 real steps (on every launched rank)"
    )
    parser.add_argument("--json", help="write the plan (and measurement) as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if cfg.task != "recognition":
        print(f"task {cfg.task}: the planner simulates recognition steps only", file=sys.stderr)
        return 2
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    accelerator = args.gpu or (not args.cpu and torch.cuda.is_available())
    if args.measure and accelerator != torch.cuda.is_available():
        print("--measure compares with this machine: leave out --gpu here", file=sys.stderr)
        return 2
    plan = plan_memory(cfg, world_size, accelerator)
    result = {"world_size": world_size, "accelerator": accelerator, **asdict(plan)}
    main_rank = int(os.environ.get("RANK", 0)) == 0
    if main_rank:
        print(plan.table())
        print(
            f"predicted peak per rank: accelerator {plan.accelerator_bytes / 2**30:.3f} GiB, "
            f"host {plan.host_bytes / 2**30:.3f} GiB"
        )
    if args.measure:
        from trainer.distributed import destroy, init_distributed

        dist = init_distributed()
        if dist.world_size != world_size:
            destroy()
            print(f"--world-size {world_size} but {dist.world_size} rank(s) were launched", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as run_dir:
            cfg.run_dir = run_dir
            cfg.metrics.tensorboard = cfg.metrics.progress_bar = False
            try:
                measured = measure(cfg, dist)
            finally:
                destroy()
        predicted = plan.host_bytes + plan.accelerator_bytes
        result.update(measured_peak_bytes=measured, predicted_over_measured=predicted / measured)
        if main_rank:
            ratio = predicted / measured
            print(f"measured tensor peak: {measured / 2**30:.3f} GiB; predicted/measured {ratio:.3f}")
    if args.json and main_rank:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.failures import finish

    finish(code)
