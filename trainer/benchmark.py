"""One memory-benchmark measurement: build a method beside a backbone, run a few training steps, and report
peak memory (by category), process RSS, step time, trainable parameters and forward FLOPs.

``launch/bench_memory.py`` runs each configuration through ``measure`` in a fresh process, so one
configuration's allocator state and peak RSS never leak into the next.

Precision is the trainer's: with bfloat16, every weight of the model (frozen and trained) and every activation
is bf16 and AdamW updates float32 master copies of the trained weights, as DeepSpeed's bf16 mode does.
Side4Video's ``handover`` option stores (and hands over) the frozen backbone in another dtype than the side
network computes in.
"""

from __future__ import annotations

import ctypes
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models import BackboneConfig, SideConfig, build_backbone, build_side_network, count_params
from models.backbone import DTYPES, SIZES
from models.baselines import (
    METHODS,
    AIMNet,
    EVLNet,
    FrozenOnly,
    FullFinetune,
    LinearProbe,
    SideRecognizer,
    STAdapterNet,
)

# Published side widths (REFERENCE section 1); other backbones get 64.
SIDE_WIDTHS = {"vit-b16": 320, "vit-b32": 320, "vit-l14": 512, "vit-e14": 576}
# Options a method accepts in its spec ("side4video:checkpoint=0,handover=float32"), with their defaults: the
# lean defaults for Side4Video.
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "side4video": {
        "checkpoint": "1",  # side-block activation checkpointing
        "handover": "",  # dtype of the frozen backbone and its taps ("": the configuration's dtype)
        "attention": "sdpa",  # side attention kernel
        "tap_every": "1",  # tap stride (1: every block)
        "width": "0",  # side width d (0: the published one)
        "mlp_chunk": str(SideConfig.mlp_chunk),  # tokens per chunk of the side MLP (0: plain autograd)
        # norm outputs recomputed in backward, not kept beside the norm's input
        "recompute_norms": str(int(SideConfig.recompute_norms)),
        "frozen_chunk": str(BackboneConfig.forward_chunk),  # images per frozen block call (0: whole batch)
    },
    # the inference-only reference, in Side4Video's handover dtype and frozen chunking
    "frozen": {"handover": "", "frozen_chunk": str(BackboneConfig.forward_chunk)},
    "evl": {"levels": "4"},  # decoder layers = last blocks tapped
    "st_adapter": {"ratio": "0.5"},
    "aim": {"ratio": "0.25"},
}
CATEGORIES = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}


@dataclass
class BenchConfig:
    """One configuration of the sweep."""

    method: str = "side4video"
    """A name from METHODS, optionally with options: ``side4video:checkpoint=0,tap_every=2``."""
    backbone: str = "vit-b16"
    """A named shape (models.backbone.SIZES), optionally depth-reduced: ``vit-e14:8``."""
    frames: int = 8
    batch: int = 2
    dtype: str = "float32"
    """Precision: float32, or bfloat16 (bf16 weights and activations, float32 master weights)."""
    device: str = "cpu"
    steps: int = 2
    """Timed training steps after one warm-up step and one memory-tracked step."""
    num_classes: int = 174
    seed: int = 0

    def __post_init__(self):
        name, options = self.parsed_method
        if name not in METHODS:
            raise ValueError(f"method {name!r} is not one of {METHODS}")
        unknown = set(options) - set(METHOD_OPTIONS.get(name, {}))
        if unknown:
            raise ValueError(
                f"method {name!r}: unknown options {sorted(unknown)}; known: {METHOD_OPTIONS.get(name)}"
            )
        if self.backbone_name not in SIZES:
            raise ValueError(f"backbone {self.backbone_name!r} is not one of {sorted(SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if min(self.frames, self.batch, self.steps) < 1:
            raise ValueError("frames, batch and steps must be positive")

    @property
    def parsed_method(self) -> tuple[str, dict[str, str]]:
        name, _, spec = self.method.partition(":")
        options = dict(item.split("=", 1) if "=" in item else (item, "") for item in spec.split(",") if item)
        return name, options

    @property
    def backbone_name(self) -> str:
        return self.backbone.partition(":")[0]

    @property
    def depth(self) -> int:
        _, _, depth = self.backbone.partition(":")
        return int(depth) if depth else SIZES[self.backbone_name].depth


class FrozenAwareMemTracker(MemTracker):
    """torch's MemTracker installs a gradient hook on every parameter of every module it sees, which a frozen
    parameter (requires_grad False) refuses; frozen parameters are counted but given no hook."""

    class _NoHook:
        def remove(self) -> None:
            pass

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        for param in module.parameters():
            if not param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (self._NoHook(), self._NoHook())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def _cpu_flash_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


_cpu_flash_attention_flops._get_raw = True  # FlopCounterMode passes tensors, not shapes
# torch's counter has no formula for the CPU flash-attention kernel that SDPA picks on CPU.
FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def allocator_for_timing() -> None:
    """Undo what the memory measurement needs of glibc's malloc before steps are timed.

    ``launch.bench_memory`` starts each measurement with a fixed 64 KiB mmap threshold, so every large freed
    block leaves the process at once and its peak RSS follows the live tensors. That makes every large
    allocation a fresh mmap with page faults (on the B/16 Side4Video step, 32% more time; on the frozen
    forward, 10%). A normal run's malloc raises the threshold to the largest freed block, up to 32 MiB,
    and trims at twice that: set both, as its steady state. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 64 * 2**20)


def build_method(cfg: BenchConfig) -> nn.Module:
    """The method's model with its backbone, on ``cfg.device``; only its trainable parameters require grad."""
    name, given = cfg.parsed_method
    opts = {**METHOD_OPTIONS.get(name, {}), **given}
    depth = cfg.depth
    taps = [depth - 1]
    if name == "evl":
        taps = list(range(max(0, depth - int(opts["levels"])), depth))
    backbone_cfg = BackboneConfig(name=cfg.backbone_name, num_layers=depth, tap_layers=taps, dtype=cfg.dtype)
    if name == "side4video":
        backbone_cfg.tap_layers, backbone_cfg.tap_every = [], int(opts["tap_every"])
    if "handover" in opts:
        backbone_cfg.dtype = opts["handover"] or cfg.dtype
    if "frozen_chunk" in opts:
        backbone_cfg.forward_chunk = int(opts["frozen_chunk"])
    backbone = build_backbone(backbone_cfg)
    classes = cfg.num_classes
    if name == "side4video":
        width = int(opts["width"]) or SIDE_WIDTHS.get(cfg.backbone_name, 64)
        side_cfg = SideConfig(
            width=width,
            num_classes=classes,
            checkpoint=opts["checkpoint"] == "1",
            attention=opts["attention"],
            mlp_chunk=int(opts["mlp_chunk"]),
            recompute_norms=opts["recompute_norms"] == "1",
        )
        model: nn.Module = SideRecognizer(backbone, build_side_network(side_cfg, backbone))
    elif name == "frozen":
        model = FrozenOnly(backbone)
    elif name == "linear_probe":
        model = LinearProbe(backbone, classes)
    elif name == "full_finetune":
        model = FullFinetune(backbone, classes)
    elif name == "st_adapter":
        model = STAdapterNet(backbone, classes, float(opts["ratio"]))
    elif name == "aim":
        model = AIMNet(backbone, classes, float(opts["ratio"]))
    else:
        model = EVLNet(backbone, classes)
    # The backbone is built in its dtype; everything else (trained) takes the precision's.
    frozen = {id(t) for t in (*backbone.parameters(), *backbone.buffers())}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in frozen and tensor.is_floating_point():
            tensor.data = tensor.data.to(DTYPES[cfg.dtype])
    return model.to(cfg.device)


class MasterWeightAdamW:
    """AdamW on float32 master copies of low-precision weights (DeepSpeed's bf16 scheme); on float32 weights
    it is plain AdamW."""

    def __init__(self, params: list[nn.Parameter], lr: float = 1e-4):
        self.params = params
        self.master = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
        # fused: one kernel per step instead of a dozen elementwise passes per tensor (torch's CPU default)
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, fused=True)

    @property
    def copies(self) -> list[torch.Tensor]:
        return [m for m, p in zip(self.master, self.params, strict=True) if m is not p]

    @torch.no_grad()
    def step(self) -> None:
        for param, master in zip(self.params, self.master, strict=True):
            if master is not param:
                master.grad, param.grad = param.grad.float(), None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for param, master in zip(self.params, self.master, strict=True):
            if master is not param:
                param.copy_(master)


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


@dataclass
class Record:
    """One row of the benchmark's JSON output."""

    method: str
    backbone: str
    frames: int
    batch: int
    dtype: str
    device: str
    image_size: int
    peak_bytes: int
    """Tensor peak of one training step: torch.cuda.max_memory_allocated on GPU, MemTracker's total on CPU."""
    peak_by_category: dict[str, int]
    reserved_bytes: int | None
    """GPU: torch.cuda.max_memory_reserved (None on CPU)."""
    rss_peak_bytes: int
    rss_delta_bytes: int
    """Peak RSS minus the RSS before the model was built (what the model and its steps added)."""
    step_seconds: float
    trainable_params: int
    frozen_params: int
    forward_gflops: float
    """Forward FLOPs of the whole batch, in 1e9."""


def measure(cfg: BenchConfig) -> Record:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    rss_before = rss_bytes()
    _log(f"building {cfg.method} beside {cfg.backbone}")
    model = build_method(cfg)
    name = cfg.parsed_method[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = MasterWeightAdamW(trainable) if name != "frozen" else None
    size = model.backbone.image_size
    dtype = DTYPES[cfg.dtype]
    frames = torch.randn(cfg.batch, cfg.frames, 3, size, size, device=device, dtype=dtype)  # (B, T, 3, H, W)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    flops = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)

    def step(count_flops: bool = False) -> None:
        with torch.set_grad_enabled(optimizer is not None), flops if count_flops else nullcontext():
            logits = model(frames)
        if optimizer is not None:
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(count_flops=True)  # warm-up: lazy optimizer state, kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker = FrozenAwareMemTracker()
    tracker.track_external(
        model, frames, labels, *([optimizer.optimizer, *optimizer.copies] if optimizer else [])
    )
    with tracker:
        step()
    (snapshot,) = (
        snap for dev, snap in tracker.get_tracker_snapshot("peak").items() if dev.type == device.type
    )
    by_category = {CATEGORIES[k]: v for k, v in snapshot.items() if k in CATEGORIES}
    peak = snapshot["Total"]
    reserved = None
    if device.type == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    rss_peak = peak_rss_bytes()  # before the timed steps, whose allocator keeps freed blocks
    allocator_for_timing()
    times = []
    for i in range(cfg.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        _log(f"step {i + 1}/{cfg.steps}: {times[-1]:.2f} s")
    trainable_params = count_params(model)
    described = ("method", "backbone", "frames", "batch", "dtype", "device")
    return Record(
        **{key: getattr(cfg, key) for key in described},
        image_size=size,
        peak_bytes=int(peak),
        peak_by_category=by_category,
        reserved_bytes=reserved,
        rss_peak_bytes=rss_peak,
        rss_delta_bytes=rss_peak - rss_before,
        step_seconds=statistics.median(times),
        trainable_params=trainable_params,
        frozen_params=count_params(model, trainable_only=False) - trainable_params,
        forward_gflops=flops.get_total_flops() / 1e9,
    )
