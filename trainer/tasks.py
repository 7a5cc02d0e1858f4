"""The task object: what differs between tasks, chosen once from ``task:`` (``build_task``).

Recognition trains a classifier with cross-entropy: the Side4Video side network beside a frozen backbone
(``model: side4video``) or a whole Video Swin (``model: video_swin``, e.g. fine-tuning after BEVT). Retrieval
adds a frozen text encoder and trains the side network's video embeddings against its captions with a
contrastive loss over the global batch. The trainer and the evaluator call the same task.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data.captions import CaptionTarget, load_tokenizer, tokenize
from data.shards import build_loader
from models import (
    build_retrieval_network,
    build_side_network,
    contrastive_loss,
    load_side_weights,
)
from models.swin3d import SwinConfig, SwinRecognizer, build_swin, check_fit, load_encoder_weights
from trainer.checkpoint import (
    read_module_state,
)
from trainer.config import (
    ConfigError,
    RunConfig,
)
from trainer.distributed import DistInfo, gather_batch
from trainer.evaluate import Scores, gather_scores
from trainer.frozen import build_frozen, build_frozen_text, gathered
from trainer.preemption import ignore_stop_signals
from trainer.retrieval import RETRIEVAL_HEADLINE, RetrievalScores, gather_retrieval_scores


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
        retrieval (in training the frozen forward ends before the side network starts; without grad side
        block i runs right after tap i: ``Side4Video.forward_features``)."""
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
