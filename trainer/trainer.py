"""The trainer: one DeepSpeed engine over the trainable network, fed from video shards.

What differs between tasks (recognition, retrieval) lives in one task object (``trainer.tasks``), chosen once
from ``task:``; BEVT pretraining (``trainer.bevt``) extends the Trainer itself. The evaluator
(``trainer.evaluator``) builds the same task's network without optimizer or training engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
from torch import nn

from data.augment import DeviceAugment
from data.shards import SKIP_KINDS, check_shard_spec
from data.video import normalize
from models import (
    count_params,
)
from trainer.checkpoint import (
    Checkpointer,
)
from trainer.config import (
    RunConfig,
    check_deepspeed_files,
    dump_config,
    resolve_deepspeed_config,
    resume_changes,
    shard_specs,
)
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.divergence import DivergenceError, DivergenceGuard, nonfinite_tensors, poisoned
from trainer.evaluate import FRAME_ORDERS, Scores, evaluate_orders
from trainer.metrics import MetricsLogger, peak_memory_bytes, strict_record
from trainer.optim import build_optimizer, build_scheduler
from trainer.preemption import PreemptionWatch
from trainer.retrieval import RetrievalScores
from trainer.tasks import Task, build_task, load_swin_init

log = logging.getLogger(__name__)


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
        bad = nonfinite_tensors(self.engine.module)
        if all_reduce_sum([len(bad)], self.dist.device)[0]:
            raise DivergenceError(
                f"step {self.step}: the model holds non-finite values (e.g. "
                f"{(bad or ['on another rank'])[0]}); no checkpoint was written; "
                f"last good checkpoint: {self.checkpointer.last or 'none'}"
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
