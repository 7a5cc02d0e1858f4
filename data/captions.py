"""Captions for text-video retrieval: parsing ``KEY.json``, tokenizing, and a small local CLIP-style BPE.

A retrieval sample is ``KEY.mp4`` + ``KEY.json`` whose ``captions`` (or ``caption``) holds one or more
sentences. Training uses one caption per video per step, drawn from the sample's (seed, epoch, key)
generator; evaluation uses every caption once.

The tokenizer is transformers' ``CLIPTokenizer`` read from a local directory (``vocab.json`` +
``merges.txt``, or ``tokenizer.json``): a real CLIP directory, or one written by ``write_bpe_tokenizer``,
which learns byte-level BPE merges with CLIP's conventions (a ``</w>`` end-of-word marker, start/end tokens)
from a corpus. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from data.shards import SkipSample

START, END = "<|startoftext|>", "<|endoftext|>"


def parse_captions(raw: bytes | None) -> list[str]:
    """``KEY.json`` bytes -> its non-empty captions, in order."""
    if raw is None:
        raise SkipSample("missing_caption", "no .json member")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample("bad_caption", f"json does not parse: {exc}") from exc
    captions = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else None
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SkipSample("missing_caption", "json has no 'captions' list of strings")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise SkipSample("missing_caption", "every caption is empty")
    return captions


@cache
def load_tokenizer(path: str):
    """A CLIPTokenizer from a local directory (cached per process: each loader worker loads it once)."""
    from transformers import CLIPTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.tokenizer: {path} is not a directory")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, captions: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ids and attention mask, each (C, max_words); long captions keep their end token."""
    out = tokenizer(
        captions, padding="max_length", truncation=True, max_length=max_words, return_tensors="pt"
    )
    return out["input_ids"], out["attention_mask"]


class CaptionTarget:
    """The text side of a retrieval sample, the clip decoder's target (as ``ClassLabel`` is for recognition).

    Training: one caption, chosen by the sample's generator -> ids (L,), mask (L,).
    Evaluation: all captions -> ids (C, L), mask (C, L).
    """

    def __init__(self, tokenizer: str, max_words: int, train: bool):
        self.tokenizer_path, self.max_words, self.train = tokenizer, max_words, train

    def __call__(self, sample: dict, rng: np.random.Generator | None) -> dict:
        captions = parse_captions(sample.get("json"))
        if self.train:
            captions = [captions[int(rng.integers(len(captions)))]]
        ids, mask = tokenize(load_tokenizer(self.tokenizer_path), captions, self.max_words)
        return {"ids": ids[0], "mask": mask[0]} if self.train else {"ids": ids, "mask": mask}

    def collate(self, targets: list[dict]) -> dict:
        """Targets of a batch -> ``text_ids``/``text_mask`` (B, L) in training; in evaluation the captions of
        all videos concatenated, (C_total, L), with ``text_video`` (C_total,) the batch index of each one's
        video and ``text_index`` its index among that video's captions."""
        if not targets:
            return {}
        if self.train:
            ids = torch.stack([t["ids"] for t in targets])
            mask = torch.stack([t["mask"] for t in targets])
            return {"text_ids": ids, "text_mask": mask}
        counts = [len(t["ids"]) for t in targets]
        return {
            "text_ids": torch.cat([t["ids"] for t in targets]),
            "text_mask": torch.cat([t["mask"] for t in targets]),
            "text_video": torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(counts)),
            "text_index": torch.cat([torch.arange(n) for n in counts]),
        }


# -- a local CLIP-style byte-level BPE -----------------------------------------------------------------------

WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenizer, restricted to what captions hold


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over the corpus' words (most frequent adjacent pair first, ties by first seen)."""
    alphabet = byte_alphabet()
    words = Counter()
    for text in texts:
        for word in WORD.findall(text.lower()):
            symbols = [alphabet[b] for b in word.encode()]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=pairs.__getitem__)
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, num_merges: int = 400) -> Path:
    """Learn merges from ``texts`` and write ``vocab.json`` + ``merges.txt`` that ``CLIPTokenizer`` reads.

    The vocabulary is CLIP's layout at a small scale: the 256 byte symbols, the same with ``</w>``, one entry
    per merge, then the start and end tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = learn_merges(texts, num_merges)
    tokens = [*alphabet, *(s + "</w>" for s in alphabet), *(a + b for a, b in merges), START, END]
    vocab = list(dict.fromkeys(tokens))  # two merges may spell the same token
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out
