"""The run config: typed dataclasses (each beside its owner) <- YAML <- ``key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
import re
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.shards import DataConfig
from models import BackboneConfig, SideConfig, TextConfig
from models.bevt import BEVTConfig
from models.swin3d import SwinConfig
from trainer.checkpoint import CheckpointConfig
from trainer.evaluate import EvalConfig
from trainer.metrics import MetricsConfig
from trainer.optim import OptimConfig

log = logging.getLogger(__name__)


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
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each skipped) before the run stops."""
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
        if self.steps < 1 or self.grad_accum < 1 or self.max_bad_steps < 1:
            raise ValueError("train.steps, train.grad_accum and train.max_bad_steps must be >= 1")
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
            merged = OmegaConf.merge(merged, read_yaml(path))
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


def read_yaml(path: str) -> DictConfig:
    """A YAML run-config file as a mapping; a file that is not one is one ConfigError naming it."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            detail = f"{exc.problem} ({exc.context})"
        raise ConfigError(f"{path}{where}: not valid YAML: {detail}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # unreadable, or OmegaConf's "Invalid loaded object type" for a scalar top level
        if "object type" not in str(exc):
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        loaded = None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if loaded is not None else "a single value"
        raise ConfigError(
            f"{path}: the top level must be a mapping of config keys (e.g. 'train:' with 'steps: 100' under "
            f"it), not {kind}"
        )
    return loaded


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config to ``path`` atomically (a kill never leaves it half written or absent)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)


def resolve_deepspeed_config(cfg: RunConfig, world_size: int, bf16_supported: bool, params: int = 0) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from the run config (one source of truth).

    ``params`` (the trainable parameter count) sizes "auto" communication buckets: DeepSpeed's defaults
    (5e8 elements) would allocate a 2 GB fp32 gradient bucket for a side network of a few million weights.
    An explicit value that contradicts the run config is an error rather than a silent mismatch.
    """
    path = Path(cfg.train.deepspeed_config)
    ds = read_deepspeed_json(path, "train.deepspeed_config")
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


# -- DeepSpeed JSON files ------------------------------------------------------------------------------------

# Sections of a DeepSpeed JSON that the trainer owns: it hands deepspeed.initialize its own optimizer and
# schedule (trainer.optim), so DeepSpeed never applies these and a learning rate set there would be ignored.
TRAINER_OWNED = {
    "optimizer": ("AdamW", ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps")),
    "scheduler": ("its warmup + cosine schedule", ("optim.warmup_steps", "optim.min_lr_ratio")),
}
# Top-level keys deepspeed.initialize reads itself, outside the config parser traced below.
READ_BY_INITIALIZE = ("sequence_parallel_size", "data_parallel_size")


@functools.cache
def deepspeed_top_level_keys() -> frozenset[str] | None:
    """The top-level keys the installed DeepSpeed reads (None if they cannot be found out).

    Recorded by running DeepSpeed's own parser (``DeepSpeedConfig._initialize_params``) over an empty dict
    that notes every key looked up, so the set is this version's: DeepSpeed silently ignores any other key.
    """
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):  # `KEY in param_dict.keys()` is recorded too
            return self

        def __bool__(self):  # some sections are read only `if param_dict and KEY in param_dict.keys()`
            return True

    parser = object.__new__(DeepSpeedConfig)  # its parsing methods alone: no world size, no batch checks
    recording = Recording()
    try:
        parser._initialize_params(recording)
        parser._param_dict, parser.global_rank = recording, 0
        parser._do_warning_check()
    except Exception as exc:  # a DeepSpeed whose parser works differently: skip the check, never block a run
        version = deepspeed.__version__
        log.warning("cannot list DeepSpeed %s's config keys (%s); unknown keys are not checked", version, exc)
        return None
    return frozenset(key for key in seen if isinstance(key, str)) | frozenset(READ_BY_INITIALIZE)


def check_deepspeed_config(ds: dict, source: str, trains: bool = True) -> None:
    """Refuse a DeepSpeed config that DeepSpeed would partly ignore or reject with a traceback.

    ``source`` prefixes messages (the run-config key and the file); ``trains``: the engine has an optimizer
    (the side network's), else it is a frozen inference engine.

    Raises:
        ConfigError: a removed or unknown top-level key, an ``optimizer``/``scheduler`` section (the trainer
            builds both), or a section its DeepSpeed config model refuses (a misspelled nested key, a wrong
            type), naming the key and, for a misspelling, the closest valid one.
    """
    import deepspeed
    from deepspeed.runtime import config as ds_config

    removed = getattr(ds_config, "_reject_removed_config_keys", None)  # DeepSpeed's own check and message
    if removed is not None:
        try:
            removed(ds)
        except ds_config.DeepSpeedConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for key, (what, settings) in TRAINER_OWNED.items():
        if key in ds:
            if not trains:
                raise ConfigError(f'{source}: "{key}": the frozen engine trains nothing; remove the section')
            raise ConfigError(
                f'{source}: "{key}" would be ignored: the trainer builds {what} itself; remove the section '
                f"and set {', '.join(settings)} in the run config"
            )
    known = deepspeed_top_level_keys()
    if known is not None:
        for key in ds:
            if key not in known:
                raise ConfigError(
                    f'{source}: unknown key "{key}", which DeepSpeed {deepspeed.__version__} would ignore'
                    f"{_did_you_mean(key, known)}"
                )
    problem = _deepspeed_parse_problem(ds)
    if problem:
        raise ConfigError(f"{source}: {problem}")


def _deepspeed_parse_problem(ds: dict) -> str | None:
    """What DeepSpeed's parser refuses in ``ds`` (one line), or None. "auto" values, which the trainer fills
    before DeepSpeed sees them, are not judged."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    def without_auto(node):  # each "auto" leaves its key at DeepSpeed's default, as DeepSpeed itself does
        if isinstance(node, dict):
            return {k: without_auto(v) for k, v in node.items() if v != "auto"}
        return copy.deepcopy(node)

    parser = object.__new__(DeepSpeedConfig)
    try:
        parser._initialize_params(without_auto(ds))
    except ValidationError as exc:
        return _validation_problem(exc, ds)
    except (DeepSpeedConfigError, AssertionError, ValueError) as exc:
        return f"DeepSpeed refuses it: {str(exc).strip().splitlines()[0]}"
    return None


def _validation_problem(exc, ds: dict) -> str | None:
    """A pydantic ValidationError of one of DeepSpeed's config models -> one line naming the JSON key."""
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        path = _json_path(ds, loc, error.get("input"))
        if error["type"] == "extra_forbidden":
            parent, _, name = path.rpartition(".")
            hint = _did_you_mean(name, _model_keys(exc.title, loc[:-1]), f"{parent}." if parent else "")
            return f'unknown key "{path}"{hint}'
        return f"{path}: {error['msg']} (got {error.get('input')!r})"
    return None


def _json_path(ds: dict, loc: tuple[str, ...], value) -> str:
    """The dotted JSON key an error location of a section's model points at: DeepSpeed validates some models
    with a top-level section (zero_optimization) and others with the whole dict (the monitors)."""
    found = []
    for prefix in [(), *((key,) for key, section in ds.items() if isinstance(section, dict))]:
        node, parts = ds, (*prefix, *loc)
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            found.append((node[parts[-1]] != value, ".".join(parts)))  # prefer the one holding the value
    return min(found)[1] if found else ".".join(loc)


def _model_keys(title: str, loc: tuple[str, ...]) -> set[str]:
    """Field names and aliases of DeepSpeed's config model named ``title``, or of its sub-model at ``loc``."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pydantic import BaseModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    def model_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for arg in typing.get_args(annotation) if (m := model_in(arg))), None)

    model = next((cls for cls in subclasses(DeepSpeedConfigModel) if cls.__name__ == title), None)
    for part in loc:
        fields = model.model_fields if model else {}
        info = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        model = model_in(info.annotation) if info else None
    if model is None:
        return set()
    return {name for name in model.model_fields} | {f.alias for f in model.model_fields.values() if f.alias}


def _did_you_mean(key: str, valid, parent: str = "") -> str:
    """A hint naming the valid key closest to a misspelt ``key`` (under ``parent``), if one is close."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.75)
    return f' (did you mean "{parent}{match[0]}"?)' if match else ""


def read_deepspeed_json(path: str | Path, key: str) -> dict:
    """Read and check (``check_deepspeed_config``) the DeepSpeed JSON that the run-config ``key`` names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")

    def unique(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:  # json keeps the last silently; DeepSpeed's own loader refuses duplicates
            raise ConfigError(f'{key}: {path}: key "{twice}" appears twice')
        return dict(pairs)

    try:
        ds = json.loads(path.read_text(), object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{key}: {path}: the top level must be a JSON object")
    check_deepspeed_config(ds, f"{key}: {path}", trains=key == "train.deepspeed_config")
    return ds


def check_deepspeed_files(cfg: RunConfig) -> None:
    """Check the DeepSpeed JSON files this run will read (before anything is built)."""
    read_deepspeed_json(cfg.train.deepspeed_config, "train.deepspeed_config")
    frozen = cfg.model == "side4video" or cfg.task == "bevt"  # a frozen backbone or tokenizer exists
    if cfg.train.frozen_deepspeed_config and frozen:
        read_deepspeed_json(cfg.train.frozen_deepspeed_config, "train.frozen_deepspeed_config")


# -- data --------------------------------------------------------------------------------------------------


def shard_specs(cfg: RunConfig) -> dict[str, str | None]:
    """The shard specs this run reads, by their config key: training and evaluation streams."""
    data = cfg.data
    specs: dict[str, str | None] = {}
    if cfg.task != "bevt" or "video" in cfg.bevt.streams:
        specs = {"data.train_shards": data.train_shards, "data.eval_shards": data.eval_shards}
    if cfg.task == "bevt":
        specs["data.image_shards"] = data.image_shards
        if data.image_eval_shards:  # optional: without it the image stream is not evaluated
            specs["data.image_eval_shards"] = data.image_eval_shards
    return specs


# -- resuming ----------------------------------------------------------------------------------------------

# Settings that shape the trained parameters or define what they were trained for: a checkpoint written
# with other values cannot be resumed (its tensors do not fit, or fit a different model). A key covers the
# keys under it; each group applies to the runs that use it.
RESUME_FIXED = {
    "task": ("task", "model"),
    "side4video": (
        "backbone.name",
        "backbone.pretrained",
        "backbone.num_layers",
        "backbone.tap_every",
        "backbone.tap_layers",
        "side.width",
        "side.heads",
        "side.mlp_ratio",
        "side.temporal_kernel",
        "side.num_classes",
        "side.block",
        "side.pos_embed",
    ),
    "video_swin": ("swin.name", "swin.num_classes"),
    "retrieval": ("text.name", "text.pretrained", "text.random_token_std", "data.tokenizer"),
    "bevt": ("bevt.stage", "bevt.decoder_dim", "bevt.tokenizer", "bevt.norms"),
}
RESUME_IGNORED = ("run_dir", "checkpoint.resume")  # equal by construction, or what asks for the resume
ABSENT = "(not in the old config)"  # the old value of a key that config.yaml did not have (older code)


def resume_fixed_keys(cfg: RunConfig) -> tuple[str, ...]:
    """The ``RESUME_FIXED`` keys that apply to this run."""
    groups = ["task", cfg.model]
    groups += [cfg.task] if cfg.task in RESUME_FIXED else []
    return tuple(key for group in groups for key in RESUME_FIXED[group])


@dataclass
class ResumeChanges:
    """How a resumed run's config differs from the one that wrote its checkpoint (changes that can resume)."""

    previous: Path
    """run_dir/config.yaml as the earlier run wrote it."""
    tag: str
    """The checkpoint folder being resumed."""
    changed: dict[str, tuple[object, object]]
    """Dotted key -> (old value, new value)."""

    def describe(self) -> str:
        items = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in self.changed.items())
        return f"resuming {self.tag} with changed settings (old -> new): {items}"

    def keep_previous(self) -> Path:
        """Copy the earlier config.yaml aside before this run's replaces it; returns where it went."""
        kept, n = self.previous.with_name(f"config.until-{self.tag}.yaml"), 1
        while kept.exists():  # resumed from the same checkpoint before
            kept, n = self.previous.with_name(f"config.until-{self.tag}.{n}.yaml"), n + 1
        shutil.copy2(self.previous, kept)  # a copy: config.yaml itself never goes missing
        return kept


def resume_changes(cfg: RunConfig) -> ResumeChanges | None:
    """Compare this run's config with the one in run_dir/config.yaml when it will resume a checkpoint there.

    Returns the changes that can resume (None if there are none, or nothing is resumed).

    Raises:
        ConfigError: a change of a ``RESUME_FIXED`` key, naming each with its old and new value.
    """
    run_dir = Path(cfg.run_dir)
    checkpoints, previous = run_dir / "checkpoints", run_dir / "config.yaml"
    # stepNNNNNNNN folders only: not the ones of a save in progress or being replaced (step*.saving, ...)
    folders = checkpoints.glob("step*")
    steps = sorted(p.name for p in folders if re.fullmatch(r"step\d+", p.name) and p.is_dir())
    if not cfg.checkpoint.resume or not steps or not previous.is_file():
        return None
    latest = checkpoints / "latest"
    named = latest.read_text(errors="replace").strip() if latest.is_file() else ""
    tag = named if named in steps else steps[-1]
    try:
        old = OmegaConf.to_container(OmegaConf.load(previous))
    except (yaml.YAMLError, OSError, OmegaConfBaseException) as exc:
        log.warning("%s cannot be read (%s): the resumed run is not compared with it", previous, exc)
        return None
    if not isinstance(old, dict):
        log.warning("%s is not a mapping: the resumed run is not compared with it", previous)
        return None
    old, new = _flatten(old), _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = {
        key: (old.get(key, ABSENT), value)
        for key, value in new.items()
        if old.get(key, ABSENT) != value and not _covered(key, RESUME_IGNORED)
    }
    fixed = resume_fixed_keys(cfg)
    refused = {k: v for k, v in changed.items() if _covered(k, fixed) and v[0] is not ABSENT}
    if refused:
        items = ", ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        values, them = ("values", "them") if len(refused) > 1 else ("value", "it")
        raise ConfigError(
            f"{items}: the checkpoint being resumed ({checkpoints / tag}) holds a model built with the "
            f"old {values}; set {them} back, or start a new run_dir"
        )
    return ResumeChanges(previous, tag, changed) if changed else None


def _covered(key: str, entries: tuple[str, ...]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in entries)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value) -> str:
    return value if value is ABSENT else json.dumps(value)
