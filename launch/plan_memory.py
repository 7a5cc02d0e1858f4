"""Predict a run's per-rank host and accelerator memory before queueing it; optionally measure it.

    python -m launch.plan_memory --config configs/NAME.yaml [--world-size N] [--cpu] [key=value ...]
    python -m launch.plan_memory --config ... --measure --json plan.json   # also run 2 real steps here

The prediction needs no memory for the model (its step is simulated on the meta device), so it works for
ViT-E on a laptop. ``--measure`` builds the real trainer in this process and tracks the tensor-level peak of
two training steps on random clips, for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict

import torch

from trainer.config import ConfigError, load_config
from trainer.memory import PeakMemory, plan_memory


def measure(cfg, steps: int = 2) -> int:
    """Tensor-level peak bytes of building the trainer and running ``steps`` training steps (one process)."""
    from trainer.distributed import destroy, init_distributed
    from trainer.trainer import Trainer

    dist = init_distributed()
    size = cfg.data.num_frames, 3
    tracker = PeakMemory()
    try:
        with tracker:
            trainer = Trainer(cfg, dist)
            image = trainer.backbone.image_size
            batch = {
                "frames": torch.randint(
                    0, 256, (cfg.data.batch_size, *size, image, image), dtype=torch.uint8
                ),
                "labels": torch.randint(0, cfg.side.num_classes, (cfg.data.batch_size,)),
                "slot": 0,
                "state": {},
            }
            batches = iter([batch] * steps * cfg.train.grad_accum)
            for _ in range(steps):
                trainer.train_step(batches)
            trainer.close()
    finally:
        destroy()
    return tracker.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the run will use")
    parser.add_argument("--cpu", action="store_true", help="plan for CPU ranks (one memory for all)")
    parser.add_argument("--measure", action="store_true", help="also measure 2 real steps here (1 rank)")
    parser.add_argument("--json", help="write the plan (and measurement) as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    accelerator = not args.cpu and torch.cuda.is_available()
    plan = plan_memory(cfg, args.world_size, accelerator)
    result = {"world_size": args.world_size, "accelerator": accelerator, **asdict(plan)}
    print(plan.table())
    print(
        f"predicted peak per rank: accelerator {plan.accelerator_bytes / 2**30:.3f} GiB, "
        f"host {plan.host_bytes / 2**30:.3f} GiB"
    )
    if args.measure:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg.run_dir = run_dir
            cfg.metrics.tensorboard = cfg.metrics.progress_bar = False
            measured = measure(cfg)
        predicted = plan.host_bytes + plan.accelerator_bytes
        result.update(measured_peak_bytes=measured, predicted_over_measured=predicted / measured)
        print(
            f"measured tensor peak: {measured / 2**30:.3f} GiB; predicted/measured {predicted / measured:.3f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
