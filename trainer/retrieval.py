"""Retrieval evaluation: every video and every caption encoded once across ranks, then the full similarity
matrix scored in chunks, rows split across ranks; R@1/5/10, median and mean rank in both directions.

Multi-caption practice (MSR-VTT, MSVD): text-to-video ranks each caption's video among all videos;
video-to-text takes, for each video, the best rank any of its captions reaches among all captions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.video import normalize
from trainer.distributed import all_gather_objects
from trainer.evaluate import lockstep, reorder_frames, skip_counts, with_videos

CHUNK_ELEMENTS = 1 << 24  # similarity entries (texts x videos x tokens x frames) scored at once

RETRIEVAL_HEADLINE = ("t2v_r1", "v2t_r1")  # reported again for the temporal check's frame orders


def rank_summary(ranks: np.ndarray, prefix: str) -> dict:
    """1-based ranks -> R@1/5/10 (fractions), median and mean rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        f"{prefix}_r1": float((ranks <= 1).mean()),
        f"{prefix}_r5": float((ranks <= 5).mean()),
        f"{prefix}_r10": float((ranks <= 10).mean()),
        f"{prefix}_median_rank": float(np.median(ranks)),
        f"{prefix}_mean_rank": float(ranks.mean()),
    }


def caption_ranks(sim: np.ndarray, text_video: np.ndarray) -> np.ndarray:
    """(Nt,) 1-based rank of each caption's own video among all videos, by similarity (see below)."""
    true = sim[np.arange(sim.shape[0]), text_video]  # (Nt,)
    return (sim >= true[:, None]).sum(1)


def retrieval_metrics(sim: np.ndarray, text_video: np.ndarray) -> dict:
    """Both directions' metrics from text-to-video similarities.

    Args:
        sim: (Nt, Nv) similarity of every caption to every video.
        text_video: (Nt,) the index of each caption's video.
    A tie with the true match counts against it (a constant model scores rank Nv, not 1).
    """
    true = sim[np.arange(sim.shape[0]), text_video]  # (Nt,)
    t2v = caption_ranks(sim, text_video)
    v2t = []
    for video in range(sim.shape[1]):
        column = sim[:, video]  # every caption against this video
        own = true[text_video == video]  # its own captions' scores
        v2t.append((column[None, :] >= own[:, None]).sum(1).min())
    return {**rank_summary(t2v, "t2v"), **rank_summary(np.array(v2t), "v2t")}


def score_in_chunks(
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    videos: torch.Tensor,
    texts: torch.Tensor,
    masks: torch.Tensor,
    device: torch.device,
) -> np.ndarray:
    """(Nt, Nv) similarities of texts (Nt, L, E) + masks to videos (Nv, T, E), a bounded block at a time."""
    num_texts, words = texts.shape[:2]
    num_videos, frames = videos.shape[:2]
    video_chunk = max(1, min(num_videos, CHUNK_ELEMENTS // (words * frames * 64)))
    text_chunk = max(1, CHUNK_ELEMENTS // (words * frames * video_chunk))
    rows = np.empty((num_texts, num_videos), np.float32)
    for t in range(0, num_texts, text_chunk):
        text = texts[t : t + text_chunk].to(device)
        mask = masks[t : t + text_chunk].to(device)
        for v in range(0, num_videos, video_chunk):
            block = score(videos[v : v + video_chunk].to(device), text, mask)
            rows[t : t + text_chunk, v : v + video_chunk] = block.float().cpu().numpy()
    return rows


@dataclass
class RetrievalScores:
    """The full caption-to-video similarity matrix (the same on every rank) and what was encoded."""

    video_keys: list[str]
    """The videos, each once, in key order."""
    text_keys: list[tuple[str, int]]
    """The captions as (video key, caption index), in that order."""
    sim: np.ndarray
    """(Nt, Nv) similarities."""
    text_video: np.ndarray
    """(Nt,) the index of each caption's video in ``video_keys``."""
    counts: dict
    """``encoded_videos``, ``encoded_captions`` and the skipped samples."""

    def metrics(self) -> dict:
        """The metrics of ``retrieval_metrics``, ``num_videos``, ``num_captions``, what the ranks encoded and
        the skipped samples."""
        if not self.video_keys:
            return {"num_videos": 0, "num_captions": 0, **self.counts}
        return {
            **retrieval_metrics(self.sim, self.text_video),
            "num_videos": len(self.video_keys),
            "num_captions": len(self.text_keys),
            **self.counts,
        }

    def write(self, out: Path, names: list[str] | None = None) -> dict:
        """Write ``caption_ranks.jsonl``: each caption's video key, caption index, the rank of its video
        (text-to-video) and the 5 best videos. Adds nothing to eval.json."""
        ranks = caption_ranks(self.sim, self.text_video)
        best = np.argsort(-self.sim, axis=1, kind="stable")[:, :5]  # (Nt, 5)
        with open(out / "caption_ranks.jsonl", "w") as handle:
            for (key, index), rank, top in zip(self.text_keys, ranks, best, strict=True):
                record = {"key": key, "caption": index, "rank": int(rank)}
                handle.write(json.dumps({**record, "top5": [self.video_keys[v] for v in top]}) + "\n")
        return {}


@torch.no_grad()
def gather_retrieval_scores(
    encode_video: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    filler: dict,
    device: torch.device,
    dtype: torch.dtype,
    order: str = "original",
    seed: int = 0,
) -> RetrievalScores:
    """Encode this rank's videos and their captions, share the videos, score this rank's captions against all
    of them, and share the rows (the same ``RetrievalScores`` on every rank).

    Args:
        encode_video: (B, T, 3, H, W) normalised clips -> (B, T, E) frame embeddings.
        encode_text: ids, mask (C, L) -> (C, L, E) token embeddings.
        score: videos (Bv, T, E), texts (Bt, L, E), masks (Bt, L) -> (Bt, Bv) similarities.
        batches: evaluation batches (one view per video) with ``text_ids``, ``text_mask``, ``text_video``.
        filler: a batch of the same layout run (and discarded) while other ranks still have data.
    """
    generator = torch.Generator().manual_seed(seed)
    keys, videos, text_keys, texts, masks = [], [], [], [], []
    slot_skips: dict[int, dict] = {}
    for batch, real in lockstep(with_videos(batches, slot_skips), filler, device):
        frames = reorder_frames(batch["frames"][:, 0], order, generator)  # (B, T, 3, H, W): one view
        clips = normalize(frames.to(device, non_blocking=True), dtype)
        video = encode_video(clips)  # (B, T, E)
        text = encode_text(batch["text_ids"].to(device), batch["text_mask"].to(device))  # (C, L, E)
        if not real:
            continue
        keys.extend(batch["keys"])
        videos.append(video.float().cpu())
        owners = [batch["keys"][i] for i in batch["text_video"].tolist()]
        text_keys.extend(zip(owners, batch["text_index"].tolist(), strict=True))
        texts.append(text.float().cpu())
        masks.append(batch["text_mask"])

    # Every rank gets every video once (the first rank holding a key keeps it).
    gathered = all_gather_objects((keys, torch.cat(videos) if videos else None, slot_skips))
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for rank, (rank_keys, rank_videos, _) in enumerate(gathered):
        for i, key in enumerate(rank_keys):
            if key not in merged:
                merged[key], owner[key] = rank_videos[i], rank
    counts = skip_counts(rank_skips for _, _, rank_skips in gathered)
    ordered = sorted(merged)
    if not ordered:
        return RetrievalScores([], [], np.zeros((0, 0)), np.zeros(0, np.int64), counts)
    index = {key: i for i, key in enumerate(ordered)}
    all_videos = torch.stack([merged[k] for k in ordered]).to(dtype)  # (Nv, T, E)

    # This rank scores the captions of the videos it owns against all videos.
    rank = torch.distributed.get_rank()
    mine = [i for i, (key, _) in enumerate(text_keys) if owner[key] == rank]
    rows = None
    if mine:
        local_texts = torch.cat(texts)[mine].to(dtype)
        local_masks = torch.cat(masks)[mine]
        rows = score_in_chunks(score, all_videos, local_texts, local_masks, device)
    all_rows = all_gather_objects(([text_keys[i] for i in mine], rows, len(text_keys)))
    text_order = sorted(
        (key, r, i) for r, (rank_keys, _, _) in enumerate(all_rows) for i, key in enumerate(rank_keys)
    )
    sim = np.stack([all_rows[r][1][i] for _, r, i in text_order])  # (Nt, Nv)
    text_video = np.array([index[key[0]] for key, _, _ in text_order])
    # what the ranks encoded together: equal to the videos and captions unless the data split repeats videos
    counts = {
        "encoded_videos": sum(len(rank_keys) for rank_keys, _, _ in gathered),
        "encoded_captions": sum(encoded for _, _, encoded in all_rows),
        **counts,
    }
    return RetrievalScores(ordered, [key for key, _, _ in text_order], sim, text_video, counts)
