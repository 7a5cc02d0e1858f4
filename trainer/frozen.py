"""Placing the frozen backbone: whole on every device, or partitioned across ranks with ZeRO-3 inference.

With a frozen DeepSpeed config (``train.frozen_deepspeed_config``) the backbone is built inside
``deepspeed.zero.Init`` so no rank ever holds it whole, its weights are loaded one piece (embeddings, block,
...) at a time through ``GatheredParameters`` with rank 0 reading the checkpoint, and it runs in an engine
without optimizer: ZeRO-3 gathers each block's weights (from the accelerator, CPU or NVMe) just before the
block runs and frees them after. Every rank must then run the same number of frozen forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import deepspeed
import torch
from torch import nn

from models import FrozenCLIPText, FrozenViT, build_backbone, build_text_encoder, meta_backbone
from trainer.config import ConfigError, RunConfig, read_deepspeed_json
from trainer.distributed import DistInfo

FrozenForward = Callable[[torch.Tensor], Iterator[torch.Tensor]]
# (construct, gather, writer) -> the frozen module, as build_backbone and build_text_encoder take them
Builder = Callable[[Callable[[], AbstractContextManager], Callable | None, bool], nn.Module]


def resolve_frozen_config(
    cfg: RunConfig, bf16_supported: bool, dtype: str | None = None, largest: Callable[[], int] | None = None
) -> dict:
    """Read the frozen models' DeepSpeed JSON and fill its "auto" values.

    ``dtype`` (default: the backbone's) decides "bf16": "auto"; ``largest`` counts the elements of the
    model's largest tensor, which sizes NVMe swap buffers (default: the backbone's)."""
    path = Path(cfg.train.frozen_deepspeed_config)
    ds = read_deepspeed_json(path, "train.frozen_deepspeed_config")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(
            f"{path}: a frozen engine partitions parameters, so zero_optimization.stage must be 3"
        )
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size  # required by DeepSpeed, unused here
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported and (dtype or cfg.backbone.dtype) == "bfloat16"
    offload = zero.get("offload_param", {})
    if offload.get("device") == "nvme":
        if offload.get("nvme_path", "auto") == "auto":
            offload["nvme_path"] = str(Path(cfg.train.offload_dir).resolve())
        if offload.get("buffer_size", "auto") == "auto":
            # each swap buffer must hold the largest tensor
            offload["buffer_size"] = largest() if largest else largest_parameter(cfg)
        Path(offload["nvme_path"]).mkdir(parents=True, exist_ok=True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def largest_parameter(cfg: RunConfig) -> int:
    """Elements of the backbone's largest tensor, from a meta-device build (nothing allocated)."""
    return max(p.numel() for p in meta_backbone(cfg.backbone).parameters())


def place_frozen(build: Builder, dist: DistInfo, ds: dict | None) -> tuple[nn.Module, Callable]:
    """Build a frozen model whole on this device (``ds`` None), or partitioned by ZeRO-3 inference per ``ds``;
    returns the model and the callable that runs it (the model itself, or its engine)."""
    if ds is None:
        model = build(nullcontext, None, True).to(dist.device)
        return model, model
    model = build(
        lambda: deepspeed.zero.Init(config_dict_or_path=ds),
        lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0),
        dist.is_main,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return model, engine


def build_frozen(cfg: RunConfig, dist: DistInfo) -> tuple[FrozenViT, FrozenForward]:
    """The frozen backbone (for its shape and taps) and the callable that runs it. Retrieval also builds a
    CLIP tower's projection into the joint space."""
    projection = cfg.task == "retrieval"
    ds = resolve_frozen_config(cfg, dist.bf16_supported) if cfg.train.frozen_deepspeed_config else None
    return place_frozen(
        lambda construct, gather, writer: build_backbone(cfg.backbone, construct, gather, writer, projection),
        dist,
        ds,
    )


def build_frozen_text(
    cfg: RunConfig, dist: DistInfo, embed_dim: int, vocab_size: int
) -> tuple[FrozenCLIPText, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The frozen text encoder, placed like the backbone (partitioned if a frozen DeepSpeed config is set)."""

    def build(construct, gather, writer):
        return build_text_encoder(cfg.text, embed_dim, vocab_size, construct, gather, writer)

    ds = None
    if cfg.train.frozen_deepspeed_config:

        def largest() -> int:
            with torch.device("meta"):
                model = build_text_encoder(cfg.text, embed_dim, vocab_size, load=False)
            return max(p.numel() for p in model.parameters())

        ds = resolve_frozen_config(cfg, dist.bf16_supported, cfg.text.dtype, largest)
    return place_frozen(build, dist, ds)


def gathered(params: list[nn.Parameter]) -> AbstractContextManager:
    """Make ZeRO-3-partitioned parameters whole for reading (a no-op for whole ones)."""
    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()


def resident_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of frozen parameters this rank holds (its ZeRO-3 partitions, or whole tensors if not sharded)."""
    total = 0
    for param in model.parameters():
        held = getattr(param, "ds_tensor", None)
        tensor = held if held is not None else param
        total += tensor.numel() * tensor.element_size()
    return total
