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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from data.video import normalize
from models import build_side_network, meta_backbone
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
        # A view or in-place result shares an input's storage: not an allocation (and the input may predate
        # the tracker, like a parameter viewed by ``weight.t()``).
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


@dataclass
class MemoryPlan:
    """Predicted peak bytes of one rank, by component and by where they live."""

    frozen_weights: int
    frozen_weights_on: str  # "accelerator", "host" (cpu offload) or "nvme"
    frozen_gathered: int  # weights gathered at once on the compute device while the frozen forward runs
    frozen_swap_buffers: int  # host buffers streaming NVMe-offloaded partitions
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


def _frozen_engine(cfg: RunConfig) -> dict | None:
    """The ZeRO settings of the frozen engine, or None when the frozen model is whole on every rank."""
    if not cfg.train.frozen_deepspeed_config:
        return None
    return json.loads(Path(cfg.train.frozen_deepspeed_config).read_text()).get("zero_optimization", {})


@dataclass
class FrozenMemory:
    """One rank's memory for the frozen backbone (bytes)."""

    resident: int  # whole model, or this rank's partitions (+ persistent small parameters)
    resident_on: str  # "accelerator", "host" or "nvme"
    gathered: int  # weights gathered at once while the frozen forward runs, plus the all-gather input buffer
    swap_buffers: int  # host buffers that stream NVMe partitions in


def frozen_memory(cfg: RunConfig, backbone, world: int, accelerator: bool) -> FrozenMemory:
    """Where the frozen weights live and how many are gathered at once, following DeepSpeed's ZeRO-3 rules.

    Parameters below ``stage3_param_persistence_threshold`` elements stay whole on every rank. The others are
    partitioned; during the forward the coordinator holds the running module's weights plus prefetched ones,
    up to ``stage3_prefetch_bucket_size`` ahead and ``stage3_max_live_parameters`` in all. One rank that
    computes where its partitions live uses them in place (nothing gathered); otherwise gathered weights are
    full-size copies on the compute device, and an all-gather also concatenates the local partitions.
    """
    itemsize = DTYPES[cfg.backbone.dtype].itemsize
    numels = [p.numel() for p in backbone.parameters()]
    zero = _frozen_engine(cfg)
    if zero is None:
        return FrozenMemory(sum(numels) * itemsize, "accelerator", 0, 0)
    persist = int(zero.get("stage3_param_persistence_threshold", 1e5))
    offload = zero.get("offload_param", {})
    device = offload.get("device", "none")
    persistent = sum(n for n in numels if n < persist)
    sharded = [n for n in numels if n >= persist]
    resident = (persistent + sum(-(-n // world) for n in sharded)) * itemsize
    swap = 0
    if device == "nvme":
        # Only partitions of at least 1 MiB are swapped to NVMe; smaller ones stay in host memory.
        small = sum(-(-n // world) for n in sharded if -(-n // world) * itemsize < 2**20) * itemsize
        buffers = offload.get("buffer_size", "auto")
        buffers = max(sharded) if buffers == "auto" else int(buffers)
        swap = int(offload.get("buffer_count", 5)) * buffers * itemsize + small
    block = max(sum(p.numel() for p in b.parameters() if p.numel() >= persist) for b in backbone.blocks)
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    live = int(zero.get("stage3_max_live_parameters", 1e9))
    at_once = min(sum(sharded), max(block, min(live, block + prefetch)))
    in_place = world == 1 and (device == "none" or not accelerator)
    gathered = 0 if in_place else at_once * itemsize + (at_once * itemsize // world if world > 1 else 0)
    on = {"none": "accelerator", "cpu": "host", "nvme": "nvme"}[device]
    return FrozenMemory(resident, on, gathered, swap)


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


@contextmanager
def fused_attention_on_meta():
    """Route ``F.scaled_dot_product_attention`` on meta tensors to a fused kernel while active.

    On the meta device SDPA always takes the math path, which materialises and saves the (L x L) attention
    matrix; real runs take a fused kernel (flash on CUDA and CPU) that keeps only the output and the
    log-sum-exp. The CPU flash kernel has meta shapes and autograd, and the same memory as CUDA flash. The
    function itself is swapped (not a TorchFunctionMode) so that checkpointed blocks recomputed inside the
    backward pass take the same path as their first forward.
    """
    original = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta" or enable_gqa:
            options = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            return original(q, k, v, attn_mask=attn_mask, **options)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def simulate_step(cfg: RunConfig, backbone, side, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(dynamic peak, saved activations, frozen-block transient) of one training step of ``backbone`` and
    ``side`` (on the meta device for a plan, or on a real one) at the configured batch shape; clips enter in
    the side network's compute ``dtype``. Storages that exist before (parameters) are not counted."""
    size, frames, batch = backbone.image_size, cfg.data.num_frames, cfg.data.train_clips
    device = next(side.parameters()).device

    transient = PeakMemory()
    hidden = torch.zeros(  # (B*T, 1 + N, W): one block's input
        batch * frames, 1 + backbone.grid**2, backbone.width, device=device, dtype=backbone.dtype
    )
    with torch.no_grad(), fused_attention_on_meta(), transient:
        backbone.chunked_block(backbone.blocks[0], hidden)

    tracker = PeakMemory()
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata in tracker._seen:  # made in this step (not a parameter)
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with fused_attention_on_meta(), tracker:
        # The batch as the trainer receives and normalises it: (B, T, 3, H, W) uint8 -> compute dtype.
        pixels = torch.zeros(batch, frames, 3, size, size, device=device, dtype=torch.uint8)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        clips = normalize(pixels, dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = side(clips, backbone(clips.flatten(0, 1)))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.train.label_smoothing)
        loss.backward()
    return tracker.peak, sum(saved.values()), transient.peak


def plan_memory(cfg: RunConfig, world_size: int = 1, accelerator: bool = True) -> MemoryPlan:
    """Predict one rank's peak memory for ``cfg`` on ``world_size`` ranks (``accelerator``: GPUs, else CPU
    ranks, where everything is host memory)."""
    backbone = meta_backbone(cfg.backbone)
    with torch.device("meta"):
        side = build_side_network(cfg.side, backbone)
    frozen = frozen_memory(cfg, backbone, world_size, accelerator)

    side_params = sum(p.numel() for p in side.parameters())
    side_ds = resolve_deepspeed_config(cfg, world_size, accelerator, side_params)
    bf16 = bool(side_ds.get("bf16", {}).get("enabled"))
    parameters, gradients, optimizer = _side_state(
        side_params, side_ds.get("zero_optimization", {}), world_size, bf16
    )
    compute = torch.bfloat16 if bf16 else torch.float32
    dynamic, saved, transient = simulate_step(cfg, backbone, side.to(compute), compute)
    # The step's dynamic peak already holds the gradients it creates, which _side_state counts.
    dynamic_without_grads = max(dynamic - side_params * compute.itemsize, saved)
    on_accelerator = parameters + gradients + optimizer + dynamic_without_grads + frozen.gathered
    on_host = frozen.swap_buffers
    if frozen.resident_on == "accelerator":
        on_accelerator += frozen.resident
    elif frozen.resident_on == "host":
        on_host += frozen.resident
    resident_on = frozen.resident_on
    if not accelerator:  # one memory: everything is host memory
        on_host, on_accelerator = on_host + on_accelerator, 0
        resident_on = "host" if resident_on == "accelerator" else resident_on
    return MemoryPlan(
        frozen.resident,
        resident_on,
        frozen.gathered,
        frozen.swap_buffers,
        parameters,
        gradients,
        optimizer,
        dynamic,
        saved,
        transient,
        on_accelerator,
        on_host,
    )
