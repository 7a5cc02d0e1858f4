"""Run by tests/test_frozen.py under `deepspeed --num_gpus 2`: a ZeRO-3-partitioned backbone vs the plain one.

Each rank writes OUT/rankN.json with the largest tap difference, its resident parameter bytes and the sizes
needed to judge them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from models import build_backbone
from trainer.config import load_config
from trainer.distributed import destroy, init_distributed
from trainer.frozen import build_frozen, resident_parameter_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    dist = init_distributed()
    model, frozen = build_frozen(cfg, dist)
    torch.manual_seed(0)
    images = torch.randn(4, 3, model.image_size, model.image_size)
    plain = build_backbone(replace(cfg.backbone, forward_chunk=0))  # the whole model, whole batches
    reference = list(plain(images))
    difference = 0.0
    for _ in range(2):  # the second pass runs on DeepSpeed's recorded trace (prefetching)
        taps = list(frozen(images))
        assert len(taps) == len(reference)
        difference = max(
            difference, *((a - b).abs().max().item() for a, b in zip(taps, reference, strict=True))
        )
    size = lambda params: sum(p.numel() * p.element_size() for p in params)
    result = {
        "rank": dist.rank,
        "world": dist.world_size,
        "max_abs_diff": difference,
        "resident_bytes": resident_parameter_bytes(model),
        "total_bytes": size(plain.parameters()),
        "block_bytes": size(plain.blocks[0].parameters()),
        "partitioned": all(hasattr(p, "ds_tensor") for p in model.parameters()),
        "nvme_params": sum(
            str(getattr(p.ds_tensor, "final_location", "")).endswith("nvme") for p in model.parameters()
        ),
        "swap_files": sorted(
            str(f.relative_to(cfg.train.offload_dir))
            for f in Path(cfg.train.offload_dir).rglob("*")
            if f.is_file()
        ),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{dist.rank}.json").write_text(json.dumps(result))
    destroy()


if __name__ == "__main__":
    main()
