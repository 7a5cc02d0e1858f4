"""The run config: typed dataclasses (each beside its owner) <- YAML <- ``key=value`` overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.shards import DataConfig
from models import BackboneConfig, SideConfig, TextConfig
from models.bevt import BEVTConfig
from models.swin3d import SwinConfig
from trainer.checkpoint import CheckpointConfig
from trainer.evaluate import EvalConfig
from trainer.metrics import MetricsConfig
from trainer.optim import OptimConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 600
    """Optimizer steps to train for."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    seed: int = 0
    """Seeds model init, data order and augmentation."""
    deepspeed_config: str = "deepspeed_configs/side_zero2.json"
    """DeepSpeed JSON for the side-network engine; its "auto" values are filled from this config."""
    frozen_deepspeed_config: str | None = None
    """DeepSpeed JSON (ZeRO-3) partitioning the frozen backbone across ranks, optionally offloaded to CPU or
    NVMe; None keeps the whole backbone on every device."""
    offload_dir: str = "/tmp/side4video_offload"
    """Directory for NVMe parameter offload (a node-local disk on clusters); fills "nvme_path": "auto"."""

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("train.steps and train.grad_accum must be >= 1")
        if self.grad_clip < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("train.grad_clip must be >= 0 and train.label_smoothing in [0, 1)")


TASKS = ("recognition", "retrieval", "bevt")
MODELS = ("side4video", "video_swin")


@dataclass
class RunConfig:
    """Everything one run needs. The defaults are the CPU demo."""

    run_dir: str = "runs/demo"
    """Where config.yaml, metrics.jsonl, TensorBoard events, checkpoints and eval.json go."""
    task: str = "recognition"
    """recognition (labels, cross-entropy, top-1/top-5), retrieval (captions, contrastive, R@k) or bevt
    (masked image and video modelling pretraining of a Video Swin)."""
    model: str = "side4video"
    """What trains: side4video (a side network beside the frozen backbone) or video_swin (the whole encoder:
    BEVT pretraining, or recognition fine-tuning from swin.init_from)."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    side: SideConfig = field(default_factory=SideConfig)
    swin: SwinConfig = field(default_factory=SwinConfig)
    """The Video Swin encoder (model: video_swin)."""
    bevt: BEVTConfig = field(default_factory=BEVTConfig)
    """BEVT pretraining (task: bevt)."""
    text: TextConfig = field(default_factory=TextConfig)
    """The frozen text encoder (retrieval only)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: {self.task!r} is not one of {TASKS}")
        if self.model not in MODELS:
            raise ValueError(f"model: {self.model!r} is not one of {MODELS}")
        if self.task == "bevt" and self.model != "video_swin":
            raise ValueError("model: BEVT pretrains a Video Swin; set model=video_swin")
        if self.task == "retrieval" and self.model != "side4video":
            raise ValueError("model: retrieval trains the Side4Video side network; set model=side4video")
        if self.task == "bevt" and not self.data.image_shards:
            raise ValueError("data.image_shards: BEVT reads image shards in both stages")
        if self.task == "retrieval":
            if not self.data.tokenizer:
                raise ValueError("data.tokenizer: retrieval needs a CLIPTokenizer directory")
            if self.data.views != 1:
                raise ValueError(
                    "data.eval_clips and data.eval_crops: retrieval evaluates one view (1 and 1)"
                )

    @property
    def num_classes(self) -> int:
        """Classes of the recognition model being trained."""
        return self.swin.num_classes if self.model == "video_swin" else self.side.num_classes


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- dotlist overrides, validated into a RunConfig.

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming the key.
    """
    try:
        merged = OmegaConf.structured(RunConfig)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None
    except ValueError as exc:  # __post_init__ validation; messages start with the key
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def resolve_deepspeed_config(cfg: RunConfig, world_size: int, bf16_supported: bool, params: int = 0) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from the run config (one source of truth).

    ``params`` (the trainable parameter count) sizes "auto" communication buckets: DeepSpeed's defaults
    (5e8 elements) would allocate a 2 GB fp32 gradient bucket for a side network of a few million weights.
    An explicit value that contradicts the run config is an error rather than a silent mismatch.
    """
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            raise ConfigError(
                f'{path}: {key}={current} contradicts the run config ({value}); set it to "auto"'
            )
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        # Partitioning a network of a few million weights saves little, and the side network's fused tap
        # projection reads its norm and projection weights outside their own modules' forwards.
        raise ConfigError(f"train.deepspeed_config: {path}: the side network trains under ZeRO stage 0-2")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = -(-int(min(max(params, 1), 5e7)) // 256) * 256  # DeepSpeed wants aligned sizes
    for precision in ("bf16", "fp16"):
        section = ds.get(precision)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = precision == "bf16" and bf16_supported
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints are noise
    return ds
