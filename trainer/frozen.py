"""Placing the frozen backbone: whole on every device, or partitioned across ranks with ZeRO-3 inference.

With a frozen DeepSpeed config (``train.frozen_deepspeed_config``) the backbone is built inside
``deepspeed.zero.Init`` so no rank ever holds it whole, its weights are loaded one piece (embeddings, block,
...) at a time through ``GatheredParameters`` with rank 0 reading the checkpoint, and it runs in an engine
without optimizer: ZeRO-3 gathers each block's weights (from the accelerator, CPU or NVMe) just before the
block runs and frees them after. Every rank must then run the same number of frozen forwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch

from models import FrozenViT, build_backbone
from trainer.config import ConfigError, RunConfig
from trainer.distributed import DistInfo

FrozenForward = Callable[[torch.Tensor], Iterator[torch.Tensor]]


def resolve_frozen_config(cfg: RunConfig, bf16_supported: bool) -> dict:
    """Read the frozen model's DeepSpeed JSON and fill its "auto" values."""
    path = Path(cfg.train.frozen_deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.frozen_deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(
            f"{path}: a frozen engine partitions parameters, so zero_optimization.stage must be 3"
        )
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size  # required by DeepSpeed, unused here
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported and cfg.backbone.dtype == "bfloat16"
    offload = zero.get("offload_param", {})
    if offload.get("device") == "nvme":
        if offload.get("nvme_path", "auto") == "auto":
            offload["nvme_path"] = str(Path(cfg.train.offload_dir).resolve())
        if offload.get("buffer_size", "auto") == "auto":
            offload["buffer_size"] = largest_parameter(cfg)  # each swap buffer must hold the largest tensor
        Path(offload["nvme_path"]).mkdir(parents=True, exist_ok=True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def largest_parameter(cfg: RunConfig) -> int:
    """Elements of the backbone's largest tensor, from a meta-device build (nothing allocated)."""
    with torch.device("meta"):
        model = build_backbone(replace(cfg.backbone, pretrained=None))
    return max(p.numel() for p in model.parameters())


def build_frozen(cfg: RunConfig, dist: DistInfo) -> tuple[FrozenViT, FrozenForward]:
    """The frozen backbone (for its shape and taps) and the callable that runs it."""
    if not cfg.train.frozen_deepspeed_config:
        model = build_backbone(cfg.backbone).to(dist.device)
        return model, model
    ds = resolve_frozen_config(cfg, dist.bf16_supported)
    model = build_backbone(
        cfg.backbone,
        construct=lambda: deepspeed.zero.Init(config_dict_or_path=ds),
        gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0),
        writer=dist.is_main,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return model, engine


def resident_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of frozen parameters this rank holds (its ZeRO-3 partitions, or whole tensors if not sharded)."""
    total = 0
    for param in model.parameters():
        held = getattr(param, "ds_tensor", None)
        tensor = held if held is not None else param
        total += tensor.numel() * tensor.element_size()
    return total
