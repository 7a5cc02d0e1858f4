"""Evaluation: multi-view top-1/top-5 and mean class accuracy over every test video once, the temporal check,
and what an evaluation writes (predictions, per-class accuracy, the confusion matrix and its plot)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.shards import DataError, expand_shards
from data.video import normalize
from trainer.distributed import all_gather_objects, all_reduce_sum

FRAME_ORDERS = ("original", "frame_shuffled", "single_frame")
CLASSES_FILE = "classes.txt"  # beside the evaluation shards: one class name per line, index = line number
CONFUSED_PAIRS = 30  # bars in the confusion plot


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


@dataclass
class Scores:
    """Every rank's videos' class probabilities, each video once, in key order (the same on every rank)."""

    keys: list[str]
    probs: np.ndarray
    """(N, classes) softmax scores averaged over the views."""
    labels: np.ndarray
    """(N,) true classes (-1: unlabelled)."""
    skipped: dict
    """The evaluation samples skipped on all ranks: ``skipped`` and ``skipped/KIND``."""

    def metrics(self) -> dict:
        """``top1``, ``top5``, ``mean_class_acc`` (top-1 per class, averaged over the classes present),
        ``num_videos`` and the skipped samples."""
        if not self.keys:
            return {"top1": 0.0, "top5": 0.0, "mean_class_acc": 0.0, "num_videos": 0, **self.skipped}
        per_class = self.class_accuracy()
        return {
            "top1": topk_accuracy(self.probs, self.labels, 1),
            "top5": topk_accuracy(self.probs, self.labels, 5),
            "mean_class_acc": float(np.mean([acc for _, acc in per_class.values()])),
            "num_videos": len(self.keys),
            **self.skipped,
        }

    def class_accuracy(self) -> dict[int, tuple[int, float]]:
        """Class -> (videos, top-1 accuracy), for every class with videos."""
        predicted = self.probs.argmax(1)
        present = np.unique(self.labels)
        return {
            int(c): (int((self.labels == c).sum()), float((predicted[self.labels == c] == c).mean()))
            for c in present
        }

    def confusion(self) -> np.ndarray:
        """(classes, classes) video counts: row = true class, column = top-1 prediction."""
        classes = self.probs.shape[1]
        matrix = np.zeros((classes, classes), np.int64)
        np.add.at(matrix, (self.labels, self.probs.argmax(1)), 1)
        return matrix

    def write(self, out: Path, names: list[str] | None) -> dict:
        """Write ``predictions.jsonl`` (key, label, top-5 classes and probabilities), ``confusion.npy`` and
        ``confusion.png`` into ``out``; return what eval.json adds: ``per_class`` (name, videos, top-1)."""
        names = names or [str(c) for c in range(self.probs.shape[1])]
        k = min(5, self.probs.shape[1])
        top = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        with open(out / "predictions.jsonl", "w") as handle:
            for key, label, classes, probs in zip(self.keys, self.labels, top, self.probs, strict=True):
                record = {
                    "key": key,
                    "label": int(label),
                    "top5": classes.tolist(),
                    "top5_probs": [round(float(probs[c]), 6) for c in classes],
                }
                handle.write(json.dumps(record) + "\n")
        per_class = [
            {"class": c, "name": names[c], "videos": n, "top1": acc}
            for c, (n, acc) in self.class_accuracy().items()
        ]
        if self.keys:
            confusion = self.confusion()
            np.save(out / "confusion.npy", confusion)
            plot_confusion(confusion, names, out / "confusion.png")
        return {"per_class": per_class}


@torch.no_grad()
def gather_scores(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    filler: dict,
    device: torch.device,
    dtype: torch.dtype,
    order: str = "original",
    seed: int = 0,
) -> Scores:
    """Score every video of ``batches`` (this rank's share) and gather all ranks' scores.

    Args:
        predict: (N, T, 3, H, W) normalised clips -> (N, classes) logits.
        batches: loader batches with ``frames`` (B, V, T, 3, H, W) uint8, ``keys`` and (if labelled)
            ``labels``.
        filler: a batch of the same layout run (and discarded) while other ranks still have data.
    Returns:
        The same ``Scores`` on every rank: each key once, in key order.
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
        labels.append(batch["labels"].numpy() if "labels" in batch else np.full(videos, -1))
    local = (
        keys,
        np.concatenate(scores) if scores else None,
        np.concatenate(labels) if labels else None,
        slot_skips,
    )
    merged_scores, merged_labels = {}, {}
    gathered = all_gather_objects(local)
    for rank_keys, rank_scores, rank_labels, _ in gathered:
        for i, key in enumerate(rank_keys):
            if key not in merged_scores:  # a key seen twice would be a data-splitting bug; count it once
                merged_scores[key], merged_labels[key] = rank_scores[i], rank_labels[i]
    skipped = skip_counts(rank_skips for *_, rank_skips in gathered)
    ordered = sorted(merged_scores)
    if not ordered:
        return Scores([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64), skipped)
    probs = np.stack([merged_scores[k] for k in ordered])
    return Scores(ordered, probs, np.array([merged_labels[k] for k in ordered]), skipped)


def evaluate_orders(score: Callable[[str], Scores], orders: Iterable[str], headline: tuple[str, ...]):
    """Score the evaluation in each frame order (``FRAME_ORDERS``): the original order's metrics, and the
    ``headline`` metrics of the others suffixed with the order (``top1_frame_shuffled``).

    Args:
        score: order -> ``Scores`` (or ``trainer.retrieval.RetrievalScores``).
    Returns:
        (metrics, the original order's scores).
    """
    result, original = {}, None
    for order in orders:
        scores = score(order)
        metrics = scores.metrics()
        if order == "original":
            result.update(metrics)
            original = scores
        else:
            result.update({f"{key}_{order}": metrics[key] for key in headline if key in metrics})
    return result, original


def most_confused(confusion: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    """The ``count`` largest off-diagonal cells as (true, predicted, videos), largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:count]
    true, predicted = np.unravel_index(flat, off.shape)
    pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(true, predicted, strict=True)]
    return [pair for pair in pairs if pair[2] > 0]


def plot_confusion(confusion: np.ndarray, names: list[str], path: Path) -> None:
    """A PNG legible at 8 or 400 classes: the most-confused pairs as bars (videos, and the share of the true
    class), beside the row-normalised matrix with classes sorted by accuracy (best first), so the confusions
    gather in the lower right; class names on its axes up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    from matplotlib import pyplot as plt
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import MaxNLocator

    classes = confusion.shape[0]
    totals = confusion.sum(1)
    rows = confusion / np.maximum(totals, 1)[:, None]  # fraction of each true class
    accuracy = np.where(totals > 0, np.diag(rows), -1.0)  # classes without videos last
    order = np.argsort(-accuracy, kind="stable")
    short = [name if len(name) <= 36 else f"{name[:17]}…{name[-18:]}" for name in names]  # both ends tell

    figure, (bars, grid) = plt.subplots(
        1, 2, figsize=(20, 10), gridspec_kw={"width_ratios": [1, 1.15]}, layout="constrained"
    )
    pairs = most_confused(confusion, CONFUSED_PAIRS)
    if pairs:
        labels = [f"{short[i]} → {short[j]}" for i, j, _ in pairs]
        counts = [n for *_, n in pairs]
        positions = np.arange(len(pairs))
        bars.barh(positions, counts, color="tab:red")
        bars.set_yticks(positions, labels, fontsize=9)
        bars.invert_yaxis()
        for y, (i, _, n) in enumerate(pairs):
            bars.text(n, y, f" {n} ({n / totals[i]:.0%})", va="center", fontsize=8)
        bars.set_xlim(0, max(counts) * 1.2)
        bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        bars.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=bars.transAxes)
        bars.set_yticks([])
    bars.set_xlabel("videos (share of the true class)")
    bars.set_title(f"{len(pairs)} most-confused pairs (true → predicted)")

    image = grid.imshow(rows[np.ix_(order, order)], cmap="viridis", norm=PowerNorm(0.5, 0, 1))
    figure.colorbar(image, ax=grid, shrink=0.8, label="fraction of the true class (square-root scale)")
    if classes <= 40:
        ticks = np.arange(classes)
        grid.set_xticks(ticks, [short[c] for c in order], rotation=90, fontsize=8)
        rates = [f"{accuracy[c]:.0%}" if totals[c] else "no videos" for c in order]
        grid.set_yticks(
            ticks, [f"{short[c]} ({rate})" for c, rate in zip(order, rates, strict=True)], fontsize=8
        )
        grid.set_xlabel("predicted class")
        grid.set_ylabel("true class (top-1 accuracy)")
    else:  # names would overlap: positions in the accuracy order (names and accuracies: eval.json per_class)
        grid.set_xlabel("predicted class (by accuracy rank)")
        grid.set_ylabel("true class (by accuracy rank)")
    grid.set_title(f"confusion of {classes} classes, sorted by top-1 accuracy (best first)")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def class_names(shards: str | None, num_classes: int, path: str | None = None) -> list[str] | None:
    """The class names of ``path``, else of a ``classes.txt`` beside the first of the ``shards`` (a local
    folder); None when there is no such file.

    Raises:
        DataError: ``path`` does not exist, or the file does not hold exactly ``num_classes`` names.
    """
    if path is None:
        try:
            first = expand_shards(shards)[0] if shards else ""
        except (DataError, FileNotFoundError, ValueError):
            return None
        candidate = Path(first).parent / CLASSES_FILE
        if "://" in first or not candidate.is_file():
            return None
        path = str(candidate)
    elif not Path(path).is_file():
        raise DataError(f"--classes: {path} does not exist")
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes or not all(names):
        blank = f" ({names.count('')} blank lines)" if "" in names else ""
        raise DataError(
            f"{path}: {len(names)} class names{blank} for {num_classes} classes: one name per line, "
            "line N naming class N"
        )
    return names
