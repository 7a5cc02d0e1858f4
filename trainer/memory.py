"""Tensor-level memory: a peak tracker, and a planner that predicts a run's per-rank memory before it runs.

``PeakMemory`` follows every tensor storage that torch ops create while it is active (a TorchDispatchMode)
and records the peak of the bytes alive; it works where torch's MemTracker refuses frozen parameters, and on
the meta device, where nothing is allocated at all.

``plan_memory`` predicts per-rank memory without allocating the model: the static state (frozen weights by
placement, side parameters, gradients and AdamW state by ZeRO stage and precision) is computed from parameter
counts, and the dynamic part (saved activations of the side network, the largest transient of a frozen block,
activation gradients) by running one training step of the configured shapes on the meta device under
``PeakMemory``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import build_backbone, build_side_network
from models.backbone import DTYPES
from trainer.config import RunConfig, resolve_deepspeed_config


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive while active (storages existing before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


@dataclass
class MemoryPlan:
    """Predicted peak bytes of one rank, by component and by where they live."""

    frozen_weights: int
    frozen_weights_on: str  # "accelerator", "host" (cpu offload) or "nvme" (only swap buffers on host)
    frozen_gathered: int  # a gathered block on the accelerator while it runs (sharded frozen model)
    side_parameters: int
    side_gradients: int
    optimizer_state: int
    step_dynamic: int  # peak of activations, transients and gradient buffers during forward + backward
    saved_activations: int  # of which: tensors kept for backward at the end of the forward
    frozen_transient: int  # of which: the largest temporary of one frozen block (no grad)
    accelerator_bytes: int
    host_bytes: int

    def table(self) -> str:
        rows = [(k, v) for k, v in asdict(self).items() if isinstance(v, int)]
        width = max(len(k) for k, _ in rows)
        lines = [f"{'component'.ljust(width)}  {'GiB':>9}"]
        lines += [f"{k.ljust(width)}  {v / 2**30:9.3f}" for k, v in rows]
        lines.append(f"frozen weights live on: {self.frozen_weights_on}")
        return "\n".join(lines)


def _frozen_placement(cfg: RunConfig) -> str:
    """Where a partitioned frozen model lives: "none" (accelerator), "cpu" or "nvme"; "whole" if unsharded."""
    if not cfg.train.frozen_deepspeed_config:
        return "whole"
    ds = json.loads(Path(cfg.train.frozen_deepspeed_config).read_text())
    return ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")


def _side_state(params: int, zero: dict, world: int, bf16: bool) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes of one rank under DeepSpeed's ``zero`` settings.

    DeepSpeed's ZeRO-1/2 optimizer keeps an fp32 copy of each rank's parameter partition beside the AdamW
    moments, also when training in fp32; stage 0 steps the client optimizer on the parameters themselves.
    With contiguous gradients it also keeps a reduction bucket (two with overlap_comm).
    """
    stage = zero.get("stage", 0)
    weight = 2 if bf16 else 4
    shard = lambda n: -(-n // world)
    parameters = params * weight if stage < 3 else shard(params) * weight
    gradients = params * weight if stage < 2 else shard(params) * 4  # ZeRO-2 reduces into an fp32 partition
    if 0 < stage < 3 and zero.get("contiguous_gradients", True):
        bucket = int(zero.get("reduce_bucket_size", 5e8))
        bucket_weight = 4 if stage == 1 or not bf16 else 2
        gradients += bucket * bucket_weight * (2 if zero.get("overlap_comm", False) else 1)
    if stage == 0:
        optimizer = 8 * params + (4 * params if bf16 else 0)
    else:
        optimizer = 12 * shard(params)  # fp32 partition copy + exp_avg + exp_avg_sq
    return parameters, gradients, optimizer


def simulate_step(cfg: RunConfig, backbone, side) -> tuple[int, int, int]:
    """(dynamic peak, saved activations, frozen-block transient) of one training step of the meta-device
    ``backbone`` and ``side`` at the configured batch shape."""
    size, frames, batch = backbone.image_size, cfg.data.num_frames, cfg.data.batch_size
    dtype = DTYPES[cfg.backbone.dtype]
    clips = torch.zeros(batch, frames, 3, size, size, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta")

    transient = PeakMemory()
    hidden = torch.zeros(batch * frames, 1 + backbone.grid**2, backbone.width, device="meta", dtype=dtype)
    with torch.no_grad(), transient:
        backbone.run_block(backbone.blocks[0], hidden)

    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage._cdata] = storage.nbytes()
        return tensor

    tracker = PeakMemory()
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = side(clips, backbone(clips.flatten(0, 1)))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
        loss.backward()
    return tracker.peak, sum(saved.values()), transient.peak


def plan_memory(cfg: RunConfig, world_size: int = 1, accelerator: bool = True) -> MemoryPlan:
    """Predict one rank's peak memory for ``cfg`` on ``world_size`` ranks."""
    with torch.device("meta"):
        backbone = build_backbone(replace(cfg.backbone, pretrained=None))
        side = build_side_network(cfg.side, backbone)
    weight_bytes = DTYPES[cfg.backbone.dtype].itemsize
    frozen_total = sum(p.numel() for p in backbone.parameters()) * weight_bytes
    block = max(sum(p.numel() for p in b.parameters()) for b in backbone.blocks) * weight_bytes
    offload = _frozen_placement(cfg)
    if offload == "whole":
        frozen, frozen_on, gathered = frozen_total, "accelerator", 0
    else:
        frozen, gathered = -(-frozen_total // world_size), block
        frozen_on = {"none": "accelerator", "cpu": "host", "nvme": "nvme"}[offload]

    side_params = sum(p.numel() for p in side.parameters())
    side_ds = resolve_deepspeed_config(cfg, world_size, accelerator, side_params)
    bf16 = bool(side_ds.get("bf16", {}).get("enabled"))
    parameters, gradients, optimizer = _side_state(
        side_params, side_ds.get("zero_optimization", {}), world_size, bf16
    )
    dynamic, saved, transient = simulate_step(cfg, backbone, side)
    # The step's dynamic peak already holds the gradients it creates; ZeRO-2 keeps only a partition of them.
    dynamic_without_grads = max(dynamic - side_params * 4, saved)
    on_accelerator = parameters + gradients + optimizer + dynamic_without_grads + gathered
    on_host = 0
    if frozen_on == "accelerator":
        on_accelerator += frozen
    elif frozen_on == "host":
        on_host += frozen
    if not accelerator:  # one memory: everything is host memory
        on_host, on_accelerator = on_host + on_accelerator, 0
        frozen_on = "host" if frozen_on == "accelerator" else frozen_on
    return MemoryPlan(
        frozen,
        frozen_on,
        gathered,
        parameters,
        gradients,
        optimizer,
        dynamic,
        saved,
        transient,
        on_accelerator,
        on_host,
    )
