"""The trainer: one DeepSpeed engine over the trainable network, fed from video shards.

Recognition trains a classifier with cross-entropy: the Side4Video side network beside a frozen backbone
(``model: side4video``), or a whole Video Swin (``model: video_swin``, e.g. fine-tuning after BEVT).
Retrieval adds a frozen text encoder and trains the side network's video embeddings against its captions
with a contrastive loss over the global batch. BEVT pretraining (``trainer.bevt``) extends this loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F

from data.augment import DeviceAugment
from data.captions import CaptionTarget, load_tokenizer, tokenize
from data.shards import SKIP_KINDS, build_loader, check_shard_spec
from data.video import normalize
from models import build_retrieval_network, build_side_network, contrastive_loss, count_params
from models.swin3d import SwinRecognizer, build_swin, check_fit, load_encoder_weights
from trainer.checkpoint import Checkpointer, read_module_state
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
from trainer.evaluate import FRAME_ORDERS, evaluate
from trainer.frozen import build_frozen, build_frozen_text, gathered
from trainer.metrics import MetricsLogger, peak_memory_bytes, strict_record
from trainer.optim import build_optimizer, build_scheduler
from trainer.preemption import PreemptionWatch, ignore_stop_signals
from trainer.retrieval import RETRIEVAL_HEADLINE, evaluate_retrieval

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig, dist: DistInfo, check_data: bool = True):
        """``check_data=False`` skips the shards' preflight, for a trainer that is never fed from them."""
        self.cfg, self.dist = cfg, dist
        # From here on a stop signal is recorded and acted on at the next step boundary (see train).
        self.preemption = PreemptionWatch().__enter__()
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)

        self.retrieval = cfg.task == "retrieval"
        self.backbone = self.frozen = None  # the frozen image model and what runs it (Side4Video only)
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

    def build_network(self) -> torch.nn.Module:
        """The trainable network (and, for Side4Video, the frozen backbone beside it); sets ``image_size``."""
        cfg = self.cfg
        if cfg.model == "video_swin":
            self.image_size = cfg.swin.image_size
            try:
                check_fit(cfg.swin.shape, self.image_size, cfg.data.num_frames)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            model = SwinRecognizer(build_swin(cfg.swin), cfg.swin.num_classes, cfg.swin.head_dropout)
            self.load_init(model)
            return model
        if self.retrieval and cfg.side.init_from:
            raise ConfigError("side.init_from: the side network it holds is a recognition model")
        self.backbone, self.frozen = build_frozen(cfg, self.dist)
        self.image_size = self.backbone.image_size
        if self.retrieval:
            return self._build_retrieval()
        side = build_side_network(cfg.side, self.backbone)
        if cfg.side.init_from:  # before the engine exists: every rank loads the same weights
            from models import load_side_weights

            try:
                note = load_side_weights(side, cfg.side.init_from)
            except ValueError as exc:
                raise ConfigError(f"side.init_from: {exc}") from None
            self.notes.append(f"side network initialised from {cfg.side.init_from}: {note}")
        return side

    def describe(self) -> str:
        cfg = self.cfg
        if self.backbone is None:
            return f"{cfg.model} {cfg.swin.name} ({cfg.task})"
        frozen = sum(getattr(p, "ds_numel", p.numel()) for p in self.backbone.parameters())
        return (
            f"backbone {cfg.backbone.pretrained or cfg.backbone.name}: {frozen:,} frozen params, "
            f"taps {self.backbone.taps}; side network"
        )

    def load_init(self, model: torch.nn.Module) -> None:
        """Initialise a Video Swin model's weights from ``swin.init_from`` (before the engine exists)."""
        swin = self.cfg.swin
        if swin.init_from:
            try:
                state = read_module_state(swin.init_from, "swin.init_from")  # its errors name the key
                note = load_encoder_weights(model, state, swin.inflate)
            except ValueError as exc:
                message = str(exc)
                raise ConfigError(
                    message if message.startswith("swin.") else f"swin.init_from: {message}"
                ) from None
            self.notes.append(f"initialised from {swin.init_from}: {note}")

    def _build_retrieval(self):
        """The retrieval side network (its frozen output head copied from the backbone); the text encoder."""
        try:
            side = build_retrieval_network(self.cfg.side, self.backbone)
        except ValueError as exc:
            raise ConfigError(f"backbone: {exc}") from None
        norm, proj = self.backbone.output_head()
        with gathered([*norm.parameters(), *proj.parameters()]):
            side.output.copy_from(norm, proj)
        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        embed_dim = side.output.proj.out_features
        _, self.text = build_frozen_text(self.cfg, self.dist, embed_dim, len(tokenizer))
        return side

    def predict(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised clips -> (B, classes) logits, or (B, T, E) frame embeddings for
        retrieval; side block i runs right after tap i."""
        if self.frozen is None:
            return self.engine(clips)
        return self.engine(clips, self.frozen(clips.flatten(0, 1)))

    def loss(self, batch: dict, clips: torch.Tensor) -> torch.Tensor:
        device = self.dist.device
        if not self.retrieval:
            logits = self.predict(clips)
            labels = batch["labels"].to(device)
            return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)
        ids, mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        text = self.text(ids, mask)  # (B, L, E), frozen
        # Text-to-video logits over the global batch: every rank's videos and captions, gathered.
        logits = self.engine(clips, self.frozen(clips.flatten(0, 1)), text, mask, gather=gather_batch)
        return contrastive_loss(logits)

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
            loss = self.loss(batch, clips)
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
        clips = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.dist.world_size * steps
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
        cfg = self.cfg
        workers = max(1, cfg.data.num_workers)
        # A resumed loader's worker w plays the slot whose batch the interrupted run would have taken next,
        # so the round-robin order over workers continues unchanged.
        target = (
            CaptionTarget(cfg.data.tokenizer, cfg.data.max_words, train)
            if self.retrieval
            else cfg.num_classes
        )
        return build_loader(
            cfg.data,
            self.image_size,
            target,
            train,
            cfg.train.seed,
            self.dist.rank,
            self.dist.world_size,
            resume=self.data_state if train else None,
            worker_offset=self.batches_seen % workers if train else 0,
            worker_init_fn=ignore_stop_signals,
        )

    # -- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self, order: str = "original") -> dict:
        self.engine.eval()
        try:
            common = (self._filler_batch(), self.dist.device, self.dtype, order, self.cfg.eval.seed)
            if self.retrieval:
                encoders = (self.predict, self.text, self.engine.module.similarity)
                return evaluate_retrieval(*encoders, self._loader(train=False), *common)
            return evaluate(self.predict, self._loader(train=False), *common)
        finally:
            self.engine.train()

    def _filler_batch(self) -> dict:
        data, size = self.cfg.data, self.image_size
        frames = torch.zeros(1, data.views, data.num_frames, 3, size, size, dtype=torch.uint8)
        if self.retrieval:  # one empty caption
            ids, mask = tokenize(load_tokenizer(data.tokenizer), [""], data.max_words)
            return {"frames": frames, "text_ids": ids, "text_mask": mask, "keys": []}
        return {"frames": frames, "labels": torch.zeros(1, dtype=torch.long), "keys": []}

    def final_evaluation(self) -> dict:
        """Evaluate the trained model (also without temporal information, if configured); write eval.json."""
        orders = FRAME_ORDERS if self.cfg.eval.temporal_check else ("original",)
        headline = RETRIEVAL_HEADLINE if self.retrieval else ("top1", "top5")
        result = {"step": self.step, "views": self.cfg.data.views}
        for order in orders:
            metrics = self.evaluate(order)
            if order == "original":
                result.update(metrics)
            else:
                result.update({f"{key}_{order}": metrics[key] for key in headline if key in metrics})
        return self.write_final(result)

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
