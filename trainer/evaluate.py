"""Evaluation: multi-view top-1/top-5 over every test video once, and BEVT's temporal-dependency check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data.video import normalize
from trainer.distributed import all_gather_objects, all_reduce_sum

FRAME_ORDERS = ("original", "frame_shuffled", "single_frame")


@dataclass
class EvalConfig:
    """Periodic and final evaluation."""

    every: int = 0
    """Optimizer steps between evaluations; 0 evaluates only at the end."""
    at_start: bool = False
    """Also evaluate before the first step (the untrained model; logged as step 0)."""
    temporal_check: bool = True
    """At the end, also evaluate with frames shuffled within each clip and with one frame repeated."""
    seed: int = 1234
    """Seed of the frame shuffles, so the check is reproducible."""

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")


def reorder_frames(frames: torch.Tensor, order: str, generator: torch.Generator) -> torch.Tensor:
    """Destroy temporal information on purpose. frames: (..., T, 3, H, W)."""
    if order == "original":
        return frames
    num = frames.shape[-4]
    if order == "single_frame":
        middle = frames[..., num // 2 : num // 2 + 1, :, :, :]
        return middle.expand_as(frames)
    if order == "frame_shuffled":
        leading = frames.shape[:-4]
        flat = frames.reshape(-1, *frames.shape[-4:])  # (clips, T, 3, H, W)
        perms = torch.argsort(torch.rand(flat.shape[0], num, generator=generator), dim=1)
        shuffled = flat[torch.arange(flat.shape[0])[:, None], perms]
        return shuffled.reshape(*leading, *frames.shape[-4:])
    raise ValueError(f"unknown frame order {order!r}; known: {FRAME_ORDERS}")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def lockstep(batches: Iterable[dict], filler: dict, device: torch.device) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, real) until every rank is out of batches; an exhausted rank gets ``filler`` (real=False).

    Sharded models gather weights collectively in every forward, so all ranks must run the same number of
    forwards even when their shares of the data differ.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if all_reduce_sum([float(batch is not None)], device)[0] == 0:
            return
        yield (batch, True) if batch is not None else (filler, False)


def with_videos(batches: Iterable[dict], slot_skips: dict[int, dict]) -> Iterator[dict]:
    """The batches that hold videos; every batch's slot skip counts (cumulative) are kept in ``slot_skips``,
    since a slot's last evaluation batch may carry only its final counts."""
    for batch in batches:
        if "state" in batch:
            slot_skips[batch["slot"]] = batch["state"]["skips"]
        if batch["keys"]:
            yield batch


def skip_counts(rank_slot_skips: Iterable[dict[int, dict]]) -> dict:
    """All ranks' per-slot skip counts -> ``skipped`` and ``skipped/KIND``."""
    skipped = Counter()
    for slot_skips in rank_slot_skips:
        for counts in slot_skips.values():
            skipped.update(counts)
    return {"skipped": sum(skipped.values()), **{f"skipped/{k}": n for k, n in sorted(skipped.items())}}


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    filler: dict,
    device: torch.device,
    dtype: torch.dtype,
    order: str = "original",
    seed: int = 0,
) -> dict:
    """Score every video of ``batches`` (this rank's share), gather all ranks' scores, compute accuracy.

    Args:
        predict: (N, T, 3, H, W) normalised clips -> (N, classes) logits.
        batches: loader batches with ``frames`` (B, V, T, 3, H, W) uint8, ``labels`` and ``keys``.
        filler: a batch of the same layout run (and discarded) while other ranks still have data.
    Returns:
        ``top1``, ``top5`` and ``num_videos`` over the union of all ranks (each key counted once), and the
        evaluation samples skipped (``skipped`` and ``skipped/KIND``).
    """
    generator = torch.Generator().manual_seed(seed)
    keys, scores, labels = [], [], []
    slot_skips: dict[int, dict] = {}
    for batch, real in lockstep(with_videos(batches, slot_skips), filler, device):
        frames = reorder_frames(batch["frames"], order, generator)
        videos, views = frames.shape[:2]
        clips = normalize(frames.to(device, non_blocking=True).flatten(0, 1), dtype)  # (B*V, T, 3, H, W)
        probs = predict(clips).float().softmax(-1).view(videos, views, -1).mean(1)  # views averaged
        if not real:
            continue
        keys.extend(batch["keys"])
        scores.append(probs.cpu().numpy())
        labels.append(batch["labels"].numpy())
    local = (
        keys,
        np.concatenate(scores) if scores else None,
        np.concatenate(labels) if labels else None,
        slot_skips,
    )
    merged_scores, merged_labels, seen = {}, {}, set()
    gathered = all_gather_objects(local)
    for rank_keys, rank_scores, rank_labels, _ in gathered:
        for i, key in enumerate(rank_keys):
            if key not in seen:  # a key seen twice would be a data-splitting bug; count it once
                seen.add(key)
                merged_scores[key], merged_labels[key] = rank_scores[i], rank_labels[i]
    counts = skip_counts(rank_skips for *_, rank_skips in gathered)
    if not seen:
        return {"top1": 0.0, "top5": 0.0, "num_videos": 0, **counts}
    ordered = sorted(seen)
    all_scores = np.stack([merged_scores[k] for k in ordered])
    all_labels = np.array([merged_labels[k] for k in ordered])
    return {
        "top1": topk_accuracy(all_scores, all_labels, 1),
        "top5": topk_accuracy(all_scores, all_labels, 5),
        "num_videos": len(ordered),
        **counts,
    }
