"""The trainer: one DeepSpeed engine over the trainable network, fed from video shards; and the evaluator: the
same network, its weights read from a checkpoint, without optimizer or training engine.

What differs between tasks lives in one task object, chosen once from ``task:`` (``build_task``): recognition
trains a classifier with cross-entropy, the Side4Video side network beside a frozen backbone
(``model: side4video``) or a whole Video Swin (``model: video_swin``, e.g. fine-tuning after BEVT); retrieval
adds a frozen text encoder and trains the side network's video embeddings against its captions with a
contrastive loss over the global batch. BEVT pretraining (``trainer.bevt``) extends the Trainer itself.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from data.augment import DeviceAugment
from data.captions import CaptionTarget, load_tokenizer, tokenize
from data.shards import SKIP_KINDS, build_loader, check_shard_spec
from data.video import normalize
from models import (
    build_retrieval_network,
    build_side_network,
    contrastive_loss,
    count_params,
    load_side_weights,
)
from models.swin3d import SwinConfig, SwinRecognizer, build_swin, check_fit, load_encoder_weights
from models.weights import fit_problems
from trainer.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    checkpoint_problem,
    newest_complete,
    read_module_state,
    resume_candidates,
)
from trainer.config import (
    ConfigError,
    RunConfig,
    check_deepspeed_files,
    dump_config,
    resolve_deepspeed_config,
    resume_changes,
    shard_specs,
)
from trainer.distributed import DistInfo, all_reduce_sum, gather_batch
from trainer.divergence import DivergenceError, DivergenceGuard, nonfinite_tensors, poisoned
from trainer.evaluate import FRAME_ORDERS, Scores, class_names, evaluate_orders, gather_scores
from trainer.frozen import build_frozen, build_frozen_text, gathered
from trainer.metrics import MetricsLogger, peak_memory_bytes, strict_record
from trainer.optim import build_optimizer, build_scheduler
from trainer.preemption import PreemptionWatch, ignore_stop_signals
from trainer.retrieval import RETRIEVAL_HEADLINE, RetrievalScores, gather_retrieval_scores

log = logging.getLogger(__name__)


# -- tasks ---------------------------------------------------------------------------------------------------


class Task:
    """One task's part of a run: the network it trains (and the frozen models beside it), its loss, what the
    loader reads as target, and its evaluation. ``network`` arguments run the trainable module: the training
    engine, or (evaluating) the module itself."""

    headline: tuple[str, ...] = ("top1", "top5")
    """Metrics reported again for the temporal check's frame orders."""

    def __init__(self, cfg: RunConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.backbone = self.frozen = None  # the frozen image model and what runs it (Side4Video only)
        self.image_size = 0  # set by build
        self.notes: list[str] = []  # lines for the log from model building

    def build(self) -> nn.Module:
        """The trainable network (before any engine exists: every rank builds the same weights)."""
        raise NotImplementedError

    def _build_backbone(self) -> None:
        self.backbone, self.frozen = build_frozen(self.cfg, self.dist)
        self.image_size = self.backbone.image_size

    def describe(self) -> str:
        cfg = self.cfg
        if self.backbone is None:
            return f"{cfg.model} {cfg.swin.name} ({cfg.task})"
        frozen = sum(getattr(p, "ds_numel", p.numel()) for p in self.backbone.parameters())
        return (
            f"backbone {cfg.backbone.pretrained or cfg.backbone.name}: {frozen:,} frozen params, "
            f"taps {self.backbone.taps}; side network"
        )

    def forward(self, network, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised clips -> (B, classes) logits, or (B, T, E) frame embeddings for
        retrieval; side block i runs right after tap i."""
        if self.frozen is None:
            return network(clips)
        return network(clips, self.frozen(clips.flatten(0, 1)))

    def loss(self, network, batch: dict, clips: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, train: bool):
        """What the loader reads besides the video (``data.shards.VideoClipDecoder``'s ``target``)."""
        raise NotImplementedError

    def filler(self) -> dict:
        """A batch that an evaluation rank out of data runs (and discards) while others still have data."""
        data, size = self.cfg.data, self.image_size
        frames = torch.zeros(1, data.views, data.num_frames, 3, size, size, dtype=torch.uint8)
        return {"frames": frames, "labels": torch.zeros(1, dtype=torch.long), "keys": []}

    def score(self, network, loader: Iterable[dict], dtype: torch.dtype, order: str):
        """Every evaluation video once over all ranks, frames in ``order`` (recognition: ``Scores``)."""
        raise NotImplementedError

    def loader(self, train: bool, target=None, resume: dict | None = None, worker_offset: int = 0):
        """This rank's training (endless) or evaluation (one pass) loader; ``target`` default: the task's."""
        cfg = self.cfg
        return build_loader(
            cfg.data,
            self.image_size,
            self.target(train) if target is None else target,
            train,
            cfg.train.seed,
            self.dist.rank,
            self.dist.world_size,
            resume=resume,
            worker_offset=worker_offset,
            worker_init_fn=ignore_stop_signals,
        )


class Recognition(Task):
    """Classes from labels: a side network beside the frozen backbone, or a whole Video Swin."""

    def build(self) -> nn.Module:
        cfg = self.cfg
        if cfg.model == "video_swin":
            self.image_size = cfg.swin.image_size
            try:
                check_fit(cfg.swin.shape, self.image_size, cfg.data.num_frames)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            model = SwinRecognizer(build_swin(cfg.swin), cfg.swin.num_classes, cfg.swin.head_dropout)
            load_swin_init(cfg.swin, model, self.notes)
            return model
        self._build_backbone()
        side = build_side_network(cfg.side, self.backbone)
        if cfg.side.init_from:
            try:
                note = load_side_weights(side, cfg.side.init_from)
            except ValueError as exc:
                raise ConfigError(f"side.init_from: {exc}") from None
            self.notes.append(f"side network initialised from {cfg.side.init_from}: {note}")
        return side

    def loss(self, network, batch: dict, clips: torch.Tensor) -> torch.Tensor:
        logits = self.forward(network, clips)
        labels = batch["labels"].to(self.dist.device)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)

    def target(self, train: bool) -> int:
        return self.cfg.num_classes

    def score(self, network, loader: Iterable[dict], dtype: torch.dtype, order: str) -> Scores:
        def predict(clips):
            return self.forward(network, clips)

        common = (self.filler(), self.dist.device, dtype, order, self.cfg.eval.seed)
        return gather_scores(predict, loader, *common)

    def features(self, network, clips: torch.Tensor, frozen: bool = False):
        """What the classifier head reads, (B, d) (the side tokens after the side network's final norm,
        averaged over tokens and frames; Video Swin's pooled stage 4), and with ``frozen`` the last tap's
        class token per frame, (B, T, W)."""
        head_inputs: list[torch.Tensor] = []
        hook = unwrap(network).head.register_forward_pre_hook(lambda _, args: head_inputs.append(args[0]))
        last: list[torch.Tensor] = []

        def remember_last(taps: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
            for tap in taps:
                last[:] = [tap]
                yield tap

        try:
            if self.frozen is None:
                network(clips)
            else:
                taps = self.frozen(clips.flatten(0, 1))
                network(clips, remember_last(taps) if frozen else taps)
        finally:
            hook.remove()
        cls = last[0][:, 0].unflatten(0, clips.shape[:2]) if frozen else None  # (B, T, W)
        return head_inputs[0], cls


class Retrieval(Task):
    """Captions against videos: the side network corrects the frozen CLIP's frame embeddings, matched to a
    frozen text encoder's tokens."""

    headline = RETRIEVAL_HEADLINE

    def build(self) -> nn.Module:
        """The retrieval side network (its frozen output head copied from the backbone); the text encoder."""
        if self.cfg.side.init_from:
            raise ConfigError("side.init_from: the side network it holds is a recognition model")
        self._build_backbone()
        try:
            side = build_retrieval_network(self.cfg.side, self.backbone)
        except ValueError as exc:
            raise ConfigError(f"backbone: {exc}") from None
        norm, proj = self.backbone.output_head()
        with gathered([*norm.parameters(), *proj.parameters()]):
            side.output.copy_from(norm, proj)
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        embed_dim = side.output.proj.out_features
        _, self.text = build_frozen_text(self.cfg, self.dist, embed_dim, len(self.tokenizer))
        return side

    def loss(self, network, batch: dict, clips: torch.Tensor) -> torch.Tensor:
        device = self.dist.device
        ids, mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        text = self.text(ids, mask)  # (B, L, E), frozen
        # Text-to-video logits over the global batch: every rank's videos and captions, gathered.
        logits = network(clips, self.frozen(clips.flatten(0, 1)), text, mask, gather=gather_batch)
        return contrastive_loss(logits)

    def target(self, train: bool) -> CaptionTarget:
        return CaptionTarget(self.cfg.data.tokenizer, self.cfg.data.max_words, train)

    def filler(self) -> dict:
        ids, mask = tokenize(self.tokenizer, [""], self.cfg.data.max_words)  # one empty caption
        return {**super().filler(), "text_ids": ids, "text_mask": mask}

    def score(self, network, loader: Iterable[dict], dtype: torch.dtype, order: str) -> RetrievalScores:
        def encode_video(clips):
            return self.forward(network, clips)

        encoders = (encode_video, self.text, unwrap(network).similarity)
        common = (self.filler(), self.dist.device, dtype, order, self.cfg.eval.seed)
        return gather_retrieval_scores(*encoders, loader, *common)


TASKS: dict[str, type[Task]] = {"recognition": Recognition, "retrieval": Retrieval}


def build_task(cfg: RunConfig, dist: DistInfo) -> Task:
    """The task object of ``task:`` (BEVT pretraining is ``trainer.bevt.BEVTTrainer``)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: {cfg.task!r} has no task object here; known: {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg, dist)


def load_swin_init(swin: SwinConfig, model: nn.Module, notes: list[str]) -> None:
    """Initialise a Video Swin model's weights from ``swin.init_from`` (before the engine exists)."""
    if swin.init_from:
        try:
            state = read_module_state(swin.init_from, "swin.init_from")  # its errors name the key
            note = load_encoder_weights(model, state, swin.inflate)
        except ValueError as exc:
            message = str(exc)
            raise ConfigError(
                message if message.startswith("swin.") else f"swin.init_from: {message}"
            ) from None
        notes.append(f"initialised from {swin.init_from}: {note}")


def unwrap(network) -> nn.Module:
    """The module a DeepSpeed engine runs (or the module itself)."""
    return getattr(network, "module", network)


# -- training ------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: RunConfig, dist: DistInfo, check_data: bool = True):
        """``check_data=False`` skips the shards' preflight, for a trainer that is never fed from them."""
        self.cfg, self.dist = cfg, dist
        # From here on a stop signal is recorded and acted on at the next step boundary (see train).
        self.preemption = PreemptionWatch().__enter__()
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)

        self.task: Task | None = None  # built by build_network (BEVT builds its network itself)
        self.notes: list[str] = []  # lines for the log from model building (written once it exists)
        # Checked before anything heavy is built or loaded, so that a wrong setting fails in seconds: an
        # evaluation spec would fail after all training steps, a changed shape in the checkpoint load.
        check_deepspeed_files(cfg)
        changes = resume_changes(cfg)
        for key, spec in shard_specs(cfg).items() if check_data else ():
            check_shard_spec(key, spec, cfg.data.allow_pipe)
        network = self.build_network()
        trainable = count_params(network)
        ds_config = resolve_deepspeed_config(cfg, dist.world_size, dist.bf16_supported, trainable)
        self.dtype = compute_dtype(ds_config)
        optimizer = build_optimizer(cfg.optim, network)
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=network, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )

        self.augment = DeviceAugment(cfg.data, self.image_size) if cfg.data.augment_on == "device" else None
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, dist)
        state = self.checkpointer.load(self.engine) or {}
        self.resumed_state = state
        self.step: int = state.get("step", 0)
        self.batches_seen: int = state.get("batches_seen", 0)
        self.data_state: dict[int, dict] = {int(k): v for k, v in state.get("data", {}).items()}

        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, dist.is_main, cfg.train.steps, self.step)
        if dist.is_main:
            if changes:  # the settings the checkpoint was trained with stay on disk beside the new ones
                self.notes.append(
                    f"{changes.describe()}; the previous config is kept as {changes.keep_previous()}"
                )
            dump_config(cfg, self.run_dir / "config.yaml")
        self.metrics.write(
            f"{self.describe()}: {trainable:,} trainable params; "
            f"{dist.world_size} rank(s) on {dist.device.type}, {self.dtype}"
        )
        for note in self.notes:
            self.metrics.write(note)

    # -- model -----------------------------------------------------------------------------------------------

    def build_network(self) -> nn.Module:
        """The trainable network, built by the task (and, for Side4Video, the frozen backbone beside it); sets
        ``task`` and ``image_size``."""
        self.task = build_task(self.cfg, self.dist)
        network = self.task.build()
        self.image_size = self.task.image_size
        self.notes.extend(self.task.notes)
        return network

    @property
    def backbone(self):
        """The frozen image model (Side4Video), or None."""
        return self.task.backbone if self.task is not None else None

    def describe(self) -> str:
        return self.task.describe()

    def load_init(self, model: nn.Module) -> None:
        """Initialise a Video Swin model's weights from ``swin.init_from`` (before the engine exists)."""
        load_swin_init(self.cfg.swin, model, self.notes)

    # -- training --------------------------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (on device)."""
        total = torch.zeros((), device=self.dist.device)
        for _ in range(self.cfg.train.grad_accum):
            batch = next(batches)
            self.data_state[batch["slot"]] = batch["state"]
            self.batches_seen += 1
            frames = batch["frames"].to(self.dist.device, non_blocking=True)  # (B, T, 3, H, W) uint8
            if self.augment is not None:
                frames = self.augment(frames)
            clips = normalize(frames, self.dtype)
            loss = self.task.loss(self.engine, batch, clips)
            self.backward_step(loss)
            total += loss.detach()
        return total / self.cfg.train.grad_accum

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward and (at the accumulation boundary) the optimizer step; a non-finite loss gets NaN
        gradients, so the engine skips the step (see trainer.divergence)."""
        self.engine.backward(poisoned(loss))
        self.engine.step()

    def train(self) -> dict:
        """Train to ``train.steps`` and evaluate; or, on a stop signal, checkpoint and return
        ``{"preempted": step}`` (every rank at the same step boundary)."""
        cfg = self.cfg
        batches = iter(self._loader(train=True))
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        saved_at = self.step if self.checkpointer.last else None  # a resumed step needs no second save
        self.guard = guard = DivergenceGuard(self.engine, cfg.train.max_bad_steps, self.dist.device)
        if cfg.eval.at_start and self.step == 0:
            self.metrics.log(0, {f"eval/{k}": v for k, v in self.evaluate().items()})
        while self.step < cfg.train.steps:
            guard.before_step()
            loss = self.train_step(batches).item()
            self.step += 1
            bad = guard.after_step(loss, self.step, self.checkpointer.last)
            if bad:  # its weights are the last good step's: no checkpoint of it either
                self.metrics.write(f"step {self.step}: non-finite loss or gradient norm; step not applied")
            window_loss, window_steps = window_loss + loss, window_steps + 1
            self.metrics.step_done(loss)
            if self.metrics.should_log(self.step) or self.step == cfg.train.steps:
                self._log_train(window_loss / window_steps, window_steps, time.perf_counter() - window_start)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self.metrics.log(self.step, {f"eval/{k}": v for k, v in self.evaluate().items()})
            if self.checkpointer.should_save(self.step) and not bad:
                self.save()
                saved_at = self.step
            if self.step < cfg.train.steps and self.preemption.requested(self.dist.device):
                if saved_at != self.step:
                    self.save()
                self.metrics.write(f"step {self.step}: stopped by a signal; resume from the checkpoint")
                return {"preempted": self.step}
        if saved_at != self.step:
            self.save()
        return self.final_evaluation()

    def train_state(self) -> dict:
        """What a checkpoint keeps of this rank besides the engine: the step and the data position."""
        return {"step": self.step, "batches_seen": self.batches_seen, "data": self.data_state}

    def save(self) -> None:
        bad = all_reduce_sum([len(nonfinite_tensors(self.engine.module))], self.dist.device)[0]
        if bad:
            last = self.checkpointer.last
            raise DivergenceError(
                f"step {self.step}: the model holds non-finite values (e.g. "
                f"{(nonfinite_tensors(self.engine.module) or ['on another rank'])[0]}); no checkpoint was "
                f"written; last good checkpoint: {last or 'none'}"
            )
        state = self.train_state()
        path = self.checkpointer.save(self.engine, self.step, state)
        self.metrics.write(f"step {self.step}: checkpoint {path}")

    def _log_train(self, loss: float, steps: int, seconds: float) -> None:
        world = self.dist.world_size
        skipped = self._skip_counts()
        reduced = all_reduce_sum([loss, *skipped], self.dist.device)
        peak = all_reduce_sum([peak_memory_bytes(self.dist.device)], self.dist.device)[0] / world
        values = {
            "loss": reduced[0] / world,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": _as_float(self.engine.get_global_grad_norm()),
            **self.throughput(steps, seconds),
            "peak_mem_gb": peak / 2**30,
            "skipped": int(sum(reduced[1:])),
            "bad_steps": self.guard.total,
            **self.window_metrics(steps),
        }
        values.update(
            {f"skipped/{kind}": int(n) for kind, n in zip(SKIP_KINDS, reduced[1:], strict=True) if n}
        )
        self.metrics.log(self.step, values)

    def throughput(self, steps: int, seconds: float) -> dict:
        clips = self.cfg.data.train_clips * self.cfg.train.grad_accum * self.dist.world_size * steps
        return {"clips_per_s": clips / max(seconds, 1e-9)}

    def window_metrics(self, steps: int) -> dict:
        """Task-specific training metrics over the ``steps`` since the last log line (none here)."""
        return {}

    def loader_states(self) -> list[dict[int, dict]]:
        """The training loaders' per-slot positions and skip counts (one loader here)."""
        return [self.data_state]

    def _skip_counts(self) -> list[int]:
        totals = dict.fromkeys(SKIP_KINDS, 0)
        for state in (state for states in self.loader_states() for state in states.values()):
            for kind, count in state.get("skips", {}).items():
                totals[kind] = totals.get(kind, 0) + count
        return [totals[kind] for kind in SKIP_KINDS]

    def _loader(self, train: bool):
        workers = max(1, self.cfg.data.num_workers)
        # A resumed loader's worker w plays the slot whose batch the interrupted run would have taken next,
        # so the round-robin order over workers continues unchanged.
        if not train:
            return self.task.loader(train)
        return self.task.loader(train, resume=self.data_state, worker_offset=self.batches_seen % workers)

    # -- evaluation ------------------------------------------------------------------------------------------

    def scores(self, order: str = "original") -> Scores | RetrievalScores:
        """The task's evaluation of the current weights, frames in ``order``."""
        self.engine.eval()
        try:
            return self.task.score(self.engine, self._loader(train=False), self.dtype, order)
        finally:
            self.engine.train()

    def evaluate(self, order: str = "original") -> dict:
        return self.scores(order).metrics()

    def final_evaluation(self) -> dict:
        """Evaluate the trained model (also without temporal information, if configured); write eval.json."""
        orders = FRAME_ORDERS if self.cfg.eval.temporal_check else ("original",)
        metrics, _ = evaluate_orders(self.scores, orders, self.task.headline)
        return self.write_final({"step": self.step, "views": self.cfg.data.views, **metrics})

    def write_final(self, result: dict) -> dict:
        """Add the training samples skipped on all ranks to ``result``; log it and write eval.json."""
        skipped = all_reduce_sum(self._skip_counts(), self.dist.device)
        result["skipped_train_samples"] = {
            kind: int(n) for kind, n in zip(SKIP_KINDS, skipped, strict=True) if n
        }
        self.metrics.log(
            self.step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        )
        if self.dist.is_main:
            text = json.dumps(strict_record(result), indent=2, allow_nan=False)
            (self.run_dir / "eval.json").write_text(text + "\n")
        self.metrics.write(f"final evaluation: {json.dumps(result)}")
        return result

    def close(self) -> None:
        self.preemption.__exit__()
        self.metrics.close()


# -- evaluation only -----------------------------------------------------------------------------------------


class Evaluator:
    """A trained (or imported) model for evaluation, prediction and feature extraction: the task's network
    built as for training (the frozen backbone placed as in training, partitioned by
    ``train.frozen_deepspeed_config``), its weights read from a checkpoint's module states; no optimizer,
    no training engine.

    Args:
        checkpoint: a checkpoint folder, or a run directory (its newest complete checkpoint); default:
            ``run_dir``'s newest complete checkpoint, else ``side.init_from`` (an imported release).
        check_data: preflight ``data.eval_shards`` (prediction on files reads no shards).
    """

    def __init__(
        self, cfg: RunConfig, dist: DistInfo, checkpoint: str | None = None, check_data: bool = True
    ):
        if cfg.task not in TASKS:
            raise ConfigError(
                f"task: {cfg.task}: a BEVT pretraining run is evaluated by its own final evaluation (masked "
                "accuracy); evaluate the fine-tuned encoder (task: recognition, model: video_swin) here"
            )
        check_deepspeed_files(cfg)
        if check_data:
            check_shard_spec("data.eval_shards", cfg.data.eval_shards, cfg.data.allow_pipe)
        self.source = find_checkpoint(cfg, checkpoint)  # None: the weights side.init_from loads
        match = re.fullmatch(r"step(\d+)", self.source.name) if self.source else None
        self.step = int(match.group(1)) if match else None
        if self.source is not None:  # the trained weights replace what the run started from
            cfg = replace(cfg, side=replace(cfg.side, init_from=None), swin=replace(cfg.swin, init_from=None))
        self.cfg, self.dist = cfg, dist
        torch.manual_seed(cfg.train.seed)  # as in training: a backbone of random weights is rebuilt the same
        self.task = build_task(cfg, dist)
        network = self.task.build()
        if self.source is not None:
            load_module_weights(network, self.source)
        ds_config = resolve_deepspeed_config(cfg, dist.world_size, dist.bf16_supported, count_params(network))
        self.dtype = compute_dtype(ds_config)
        self.network = network.to(dist.device, self.dtype).eval()
        self.weights = str(self.source or cfg.side.init_from)
        log.info("%s; weights from %s", self.task.describe(), self.weights)
        for note in self.task.notes:
            log.info(note)

    def class_names(self, path: str | None = None) -> list[str] | None:
        """Class names from ``path``, or a classes.txt beside the evaluation shards (None: none there)."""
        return class_names(self.cfg.data.eval_shards, self.cfg.num_classes, path)

    def scores(self, order: str = "original") -> Scores | RetrievalScores:
        return self.task.score(self.network, self.task.loader(train=False), self.dtype, order)

    def evaluate(self, out: Path) -> dict:
        """Evaluate on ``data.eval_shards`` in the configured views (and the temporal check); write eval.json
        and the task's outputs (recognition: predictions, per-class accuracy, confusion matrix; retrieval:
        each caption's rank) into ``out``. Returns eval.json's record."""
        cfg = self.cfg
        names = self.class_names() if isinstance(self.task, Recognition) else None
        orders = FRAME_ORDERS if cfg.eval.temporal_check else ("original",)
        metrics, scores = evaluate_orders(self.scores, orders, self.task.headline)
        result = {"step": self.step, "weights": self.weights, "views": cfg.data.views, **metrics}
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            result.update(scores.write(out, names))
            text = json.dumps(strict_record(result), indent=2, allow_nan=False)
            (out / "eval.json").write_text(text + "\n")
        return result


def find_checkpoint(cfg: RunConfig, checkpoint: str | None) -> Path | None:
    """The checkpoint folder to evaluate (see ``Evaluator``); None when ``side.init_from`` stands in.

    Raises:
        CheckpointError: none found, or the named folder is not a complete checkpoint.
    """
    if checkpoint is None:
        newest = newest_complete(Path(cfg.run_dir) / "checkpoints")
        if newest is None and cfg.model == "side4video" and cfg.side.init_from:
            return None
        if newest is None:
            raise CheckpointError(
                f"{cfg.run_dir} holds no complete checkpoint; train first or pass --checkpoint"
            )
        return newest
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint: {path} is not a checkpoint folder or run directory (an imported release: "
            "set side.init_from to it)"
        )
    if any(path.glob("mp_rank_*_model_states.pt")) or (path / MARKER).exists():
        problem = dict(resume_candidates(path.parent)).get(path, checkpoint_problem(path))
        if problem:
            raise CheckpointError(f"--checkpoint: {path} is not a complete checkpoint: {problem}")
        return path
    for folder in (path / "checkpoints", path):
        newest = newest_complete(folder) if folder.is_dir() else None
        if newest is not None:
            return newest
    raise CheckpointError(f"--checkpoint: {path} holds no complete checkpoint")


def load_module_weights(network: nn.Module, folder: Path) -> None:
    """Load a checkpoint's module states (weights only, no optimizer state) into ``network``, strictly.

    Raises:
        CheckpointError: the file cannot be read, or its tensors do not fit the network (each kind listed).
    """
    try:
        state = read_module_state(str(folder), "--checkpoint")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    problems = fit_problems(network.state_dict(), state)
    if any(problems.values()):
        shown = ", ".join(f"{len(names)} {kind} {names[:3]}" for kind, names in problems.items() if names)
        raise CheckpointError(
            f"{folder} does not fit the network this config builds ({shown}): evaluate with the config "
            "the run was trained with (its run_dir/config.yaml)"
        )
    network.load_state_dict(state, strict=True)


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the side engine computes in, as its DeepSpeed config says."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
