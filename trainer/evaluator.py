"""The evaluator: a task's network with its weights read from a checkpoint (or ``side.init_from``), without
optimizer or training engine; ``launch.evaluate``, ``launch.predict`` and ``launch.extract_features`` use it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from data.shards import check_shard_spec
from models import (
    count_params,
)
from models.weights import fit_problems
from trainer.checkpoint import (
    MARKER,
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
    resolve_deepspeed_config,
)
from trainer.distributed import DistInfo
from trainer.evaluate import FRAME_ORDERS, Scores, class_names, evaluate_orders
from trainer.metrics import strict_record
from trainer.retrieval import RetrievalScores
from trainer.tasks import TASKS, Recognition, build_task
from trainer.trainer import compute_dtype

log = logging.getLogger(__name__)


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
