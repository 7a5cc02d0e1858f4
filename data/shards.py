"""WebDataset tar shards of videos -> batches of uint8 clips.

A sample is ``KEY.mp4`` (or another container) + ``KEY.cls`` (integer label) + optional ``KEY.json``; for
retrieval, ``KEY.json`` holds the captions and ``KEY.cls`` is not needed (see ``data.captions``). Image
shards (``KEY.jpg`` + optional ``KEY.cls``, see ``data.images``) stream through the same ``VideoShards`` with
an image decoder.

Streaming contract:
- Each (rank, worker) pair is a *slot*. Shards are dealt to slots round-robin; with fewer shards than slots,
  every slot reads all shards and keeps every ``slots``-th sample instead.
- Training streams forever: the slot loops over its shards epoch after epoch, reshuffled from
  (seed, epoch), so every rank can run the same number of steps.
- A training batch holds ``batch_size`` videos; with ``data.repeats`` R each gives R independently
  augmented clips of the same decoded frames, so it has batch_size x R clips and labels, one key per video.
- Each batch carries its slot's position (epoch, raw samples consumed) and its cumulative skip counts; the
  trainer stores them in checkpoints and a resumed stream skips exactly the consumed raw samples, without
  decoding them.
- A sample that cannot be used (undecodable video, missing or bad label, too few frames, ...) is skipped and
  counted by kind; it never ends the run, unless more than ``max_skip_fraction`` of a slot's samples are
  bad: then one ``DataError`` says the dataset looks broken.
- Shards are local paths or fsspec URLs (``s3://``, ``gs://``, ``https://``, ...). ``pipe:`` URLs run a shell
  command and are refused unless ``allow_pipe`` is set.
"""

from __future__ import annotations

import logging
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.augment import ClipRandAugment
from data.decode import VIDEO_EXTENSIONS, VideoDecodeError, open_video, read_frames
from data.video import crop_boxes, crop_resize, random_resized_crop_box, read_frames_at, segment_indices

log = logging.getLogger(__name__)

SKIP_KINDS = (
    "decode_error",
    "missing_video",
    "missing_image",
    "missing_label",
    "bad_label",
    "too_few_frames",
    "missing_caption",
    "bad_caption",
    "broken_shard",
    "unreachable_shard",
)
SHARD_SKIPS = ("broken_shard", "unreachable_shard")  # the others are counted per sample
WARN_LIMIT = 5  # warnings logged per skip kind and worker; the rest are only counted
SKIP_CHECK_AFTER = 100  # samples a slot reads before the skip-rate ceiling applies


class DataError(Exception):
    """The data cannot be used as configured: a refused URL, or a dataset that is mostly broken."""


@dataclass
class DataConfig:
    """Where the shards are and how clips are sampled and augmented."""

    train_shards: str = "shards/synthetic/train-{000000..000007}.tar"
    """Training shards: a path, brace pattern, or several joined by '::'."""
    eval_shards: str = "shards/synthetic/test-{000000..000001}.tar"
    """Evaluation shards, read once per evaluation, each sample exactly once across ranks."""
    num_frames: int = 8
    """Frames per clip (TSN segments)."""
    min_frames: int = 0
    """Videos with fewer frames are skipped and counted; 0 means num_frames."""
    batch_size: int = 16
    """Videos per rank per micro-step (each gives ``repeats`` clips in training)."""
    eval_batch_size: int = 16
    """Videos per rank per evaluation step (each with clips x crops views)."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""
    decode_threads: int = 1
    """decord threads per reader."""
    shuffle_buffer: int = 256
    """Samples held for shuffling within a worker (training)."""
    repeats: int = 1
    """Training clips per video per micro-step, each augmented independently from the same decoded frames
    (repeated augmentation; the release's ``num_sample: 2`` on SSv2): a batch holds batch_size x repeats
    clips, video after video, with one label per clip. Recognition only."""
    train_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    """Random-resized-crop area range, as fractions of the frame (at ``decode_size`` when it is set)."""
    train_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    """Random-resized-crop aspect-ratio range (log-uniform)."""
    hflip: bool = False
    """Random horizontal flip in training. Off by default: it swaps left/right motion classes (unless
    ``flip_label_map`` swaps their labels too)."""
    flip_label_map: list[list[int]] = field(default_factory=list)
    """Class pairs [a, b] whose labels swap when a training clip is flipped: a flipped clip of class a
    trains as b and the other way round; other classes keep theirs (SSv2: [[86, 87], [93, 94], [166, 167]],
    "from left to right" and "from right to left" and their kin). Needs ``hflip``; recognition only."""
    eval_clips: int = 1
    """Temporal clips per test video."""
    eval_crops: int = 1
    """Spatial crops per test clip (1: centre, 3: start/centre/end)."""
    decode_size: list[int] = field(default_factory=list)
    """[height, width] training frames are scaled to while decoding (decord), aspect not kept, before the
    random-resized crop; empty decodes at the video's own size. The release's SSv2 crop resizes to 256 x 320
    first: [256, 320]. Required by augment_on=device (the device batch needs one size)."""
    augment_on: str = "cpu"
    """Where training clips are cropped and augmented: "cpu" (in the workers: crop, flip, RandAugment) or
    "device" (in batch, kornia: random resized crop, colour jitter, RandAugment; workers then only decode at
    decode_size and flip, so that the label can follow the flip)."""
    color_jitter: float = 0.0
    """Colour-jitter strength on the device (brightness, contrast, saturation; hue a quarter), 0 = off."""
    randaugment: list[int] = field(default_factory=lambda: [0, 9])
    """[ops per clip, magnitude 0-30] of RandAugment, one draw per clip applied alike to all its frames; 0
    ops = off. On the CPU path data.augment.ClipRandAugment after the crop, on the device kornia's
    (magnitude 1-29). The release's "m7 n4" is on timm's 0-10 scale: [4, 21]."""
    max_skip_fraction: float = 0.2
    """Stop with an error once more than this fraction of a slot's samples were skipped (checked after its
    first 100 samples); 1 never stops."""
    allow_pipe: bool = False
    """Allow ``pipe:COMMAND`` shard URLs, which run COMMAND in a shell."""
    tokenizer: str | None = None
    """Retrieval: a local CLIPTokenizer directory (vocab.json + merges.txt, or tokenizer.json)."""
    image_shards: str | None = None
    """BEVT: image training shards (``KEY.jpg``/``KEY.png``, optional ``KEY.cls``), read beside the videos."""
    image_eval_shards: str | None = None
    """BEVT: image shards for the masked-accuracy evaluation (None: the image stream is not evaluated)."""
    image_batch_size: int = 64
    """BEVT: images per rank per micro-step (published: 64 beside 8 clips)."""
    max_words: int = 32
    """Retrieval: tokens per caption, start and end tokens included (longer ones are cut, keeping the end)."""

    def __post_init__(self):
        if self.num_frames < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.num_frames, data.batch_size and data.eval_batch_size must be positive")
        if self.eval_crops not in (1, 3):
            raise ValueError(f"data.eval_crops must be 1 or 3, got {self.eval_crops}")
        if self.augment_on not in ("cpu", "device"):
            raise ValueError(f"data.augment_on must be 'cpu' or 'device', got {self.augment_on!r}")
        if self.decode_size and (len(self.decode_size) != 2 or min(self.decode_size) < 1):
            raise ValueError(f"data.decode_size must be [height, width] or empty, got {self.decode_size}")
        if self.augment_on == "device" and not self.decode_size:
            raise ValueError("data.augment_on=device needs data.decode_size (one frame size per batch)")
        if len(self.randaugment) != 2 or self.randaugment[0] < 0 or not 0 <= self.randaugment[1] <= 30:
            raise ValueError(f"data.randaugment must be [ops >= 0, magnitude 0-30], got {self.randaugment}")
        if (
            self.augment_on == "device"
            and self.randaugment[0]
            and not (0 < self.randaugment[1] < 30 and self.randaugment[0] <= 15)
        ):
            raise ValueError(
                f"data.randaugment on the device (kornia) needs at most 15 ops and a magnitude within 1-29, "
                f"got {self.randaugment}"
            )
        if self.augment_on == "cpu" and self.color_jitter:
            raise ValueError("data.color_jitter runs on the device: set data.augment_on=device")
        if self.repeats < 1:
            raise ValueError(f"data.repeats must be >= 1, got {self.repeats}")
        check_flip_label_map(self.flip_label_map, self.hflip)
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be within [0, 1], got {self.max_skip_fraction}")
        if self.max_words < 3:
            raise ValueError(f"data.max_words must be >= 3, got {self.max_words}")
        if self.eval_clips < 1:
            raise ValueError(f"data.eval_clips must be >= 1, got {self.eval_clips}")
        if len(self.train_scale) != 2 or not 0 < self.train_scale[0] <= self.train_scale[1] <= 1:
            raise ValueError(f"data.train_scale must be [low, high] within (0, 1], got {self.train_scale}")
        if len(self.train_ratio) != 2 or not 0 < self.train_ratio[0] <= self.train_ratio[1]:
            raise ValueError(
                f"data.train_ratio must be [low, high] with 0 < low <= high, got {self.train_ratio}"
            )

    @property
    def views(self) -> int:
        return self.eval_clips * self.eval_crops

    @property
    def train_clips(self) -> int:
        """Clips per rank per training micro-step: batch_size videos x repeats."""
        return self.batch_size * self.repeats


def check_flip_label_map(pairs: list[list[int]], hflip: bool) -> None:
    """``data.flip_label_map``: pairs of two different class indices, no class in two pairs; needs hflip."""
    if any(len(pair) != 2 or pair[0] == pair[1] or min(pair) < 0 for pair in pairs):
        raise ValueError(f"data.flip_label_map must be pairs [a, b] of two different classes, got {pairs}")
    classes = [c for pair in pairs for c in pair]
    if len(set(classes)) != len(classes):
        raise ValueError(f"data.flip_label_map: a class appears in more than one pair: {pairs}")
    if pairs and not hflip:
        raise ValueError("data.flip_label_map swaps labels of flipped clips: set data.hflip=true")


def expand_shards(spec: str, allow_pipe: bool = False) -> list[str]:
    """Brace patterns and '::'-joined lists -> shard URLs. Local paths must exist; ``pipe:`` URLs need
    ``allow_pipe``."""
    urls = [url for part in spec.split("::") if part for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    if not allow_pipe and any(url.startswith("pipe:") for url in urls):
        raise DataError(
            f"{spec!r}: pipe: URLs run shell commands and are refused; set data.allow_pipe=true to read them"
        )
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r} (from {spec!r})"
        )
    return urls


def open_shard(url: str, allow_pipe: bool = False):
    """A binary stream of one shard: ``pipe:COMMAND``'s output (if allowed), else through fsspec."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(f"{url}: pipe: URLs are refused unless data.allow_pipe=true")
        return subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE).stdout
    return fsspec.open(url, "rb").open()


def check_shard_spec(key: str, spec: str | None, allow_pipe: bool = False) -> str:
    """Preflight of the shard spec of config ``key``: expand it, open its first shard and read the first tar
    header, so that a wrong pattern, a missing file, a folder, a file that is no tar or a refused ``pipe:``
    URL stops the run before its first step (a loader meets an evaluation spec only after training).
    Returns the first shard's URL.

    Raises:
        DataError: one line that starts with ``key``.
    """
    import tarfile  # (here, not at the top: this function is the module's only user)

    if not spec:
        raise DataError(f"{key}: no shards are set")
    try:
        url = expand_shards(spec, allow_pipe)[0]
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise DataError(f"{key}: {exc}") from None
    if "://" not in url and not url.startswith("pipe:") and Path(url).is_dir():
        raise DataError(f"{key}: {url} is a directory, not a shard (a .tar file or a pattern of them)")
    try:
        stream = open_shard(url, allow_pipe)
    except Exception as exc:  # fsspec's errors differ by protocol; any of them means the shard is unreadable
        raise DataError(f"{key}: {url} cannot be opened: {type(exc).__name__}: {exc}") from None
    try:
        # Streaming mode, as the loader reads shards (webdataset): compressed tars are accepted too.
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            tar.next()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{key}: {url} is not a tar shard ({type(exc).__name__}: {exc})") from None
    return url


class SkipSample(Exception):
    """A sample that cannot be used; ``kind`` names why (a metrics key)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def sample_rng(seed: int, epoch: int, key: str, repeat: int = 0) -> np.random.Generator:
    """Augmentation randomness fixed by (seed, epoch, key) and, for a video's further clips, ``repeat``:
    independent of worker count and order."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode()), *([repeat] if repeat else [])])


def parse_label(sample: dict, num_classes: int) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise SkipSample("missing_label", "no .cls member")
    try:
        label = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SkipSample("bad_label", f"label {raw[:20]!r} is not an integer") from exc
    if not 0 <= label < num_classes:
        raise SkipSample("bad_label", f"label {label} outside [0, {num_classes})")
    return label


class ClassLabel:
    """The recognition target: the sample's class index. ``collate`` -> ``labels`` (B,)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, sample: dict, rng: np.random.Generator | None) -> int:
        return parse_label(sample, self.num_classes)

    def collate(self, targets: list[int]) -> dict:
        return {"labels": torch.tensor(targets, dtype=torch.long)}


class Unlabelled:
    """No target (pretraining, tokenizer fitting): labels, if the shards have them, are not read."""

    def __call__(self, sample: dict, rng: np.random.Generator | None) -> None:
        return None

    def collate(self, targets: list) -> dict:
        return {}


def video_bytes(sample: dict) -> bytes:
    for ext in VIDEO_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SkipSample(
        "missing_video", f"no video member among {sorted(k for k in sample if not k.startswith('__'))}"
    )


class VideoClipDecoder:
    """Raw sample dict -> (frames uint8, target). Training: (T, 3, S, S), or with ``data.repeats`` R > 1 the
    video's R clips (R, T, 3, S, S) and a list of R targets; test: (views, T, 3, S, S).

    ``target`` is the number of classes (a ``ClassLabel``) or an object with the same interface, e.g.
    ``data.captions.CaptionTarget``; its ``collate`` turns a batch's targets into batch entries.
    """

    def __init__(self, cfg: DataConfig, image_size: int, target, train: bool, seed: int):
        self.target = ClassLabel(target) if isinstance(target, int) else target
        self.cfg, self.size, self.train, self.seed = cfg, image_size, train, seed
        self.repeats = cfg.repeats if train else 1  # clips per sample; VideoShards batches them
        self.flip_map = {a: b for pair in cfg.flip_label_map for a, b in (pair, pair[::-1])}
        if (self.repeats > 1 or self.flip_map) and not isinstance(self.target, ClassLabel):
            raise ValueError("data.repeats and data.flip_label_map apply to class labels (recognition) only")
        if self.flip_map and max(self.flip_map) >= self.target.num_classes:
            raise ValueError(
                f"data.flip_label_map names class {max(self.flip_map)} of {self.target.num_classes} classes"
            )
        count, magnitude = cfg.randaugment
        cpu_augment = train and cfg.augment_on == "cpu" and count
        self.randaugment = ClipRandAugment(count, magnitude) if cpu_augment else None

    def collate(self, targets: list) -> dict:
        return self.target.collate(targets)

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, object]:
        cfg = self.cfg
        key = sample.get("__key__", "")
        target = self.target(sample, sample_rng(self.seed + 1, epoch, key) if self.train else None)
        try:
            size = tuple(cfg.decode_size) if self.train and cfg.decode_size else None
            video = video_bytes(sample)
            reader = open_video(video, cfg.decode_threads, size)
            total = len(reader)
            if total < max(cfg.num_frames, cfg.min_frames):
                raise SkipSample("too_few_frames", f"{total} frames < {max(cfg.num_frames, cfg.min_frames)}")
            if self.train:
                rng = sample_rng(self.seed, epoch, sample["__key__"])
                indices = segment_indices(total, cfg.num_frames, rng=rng)  # one draw: the clips share frames
                if size:
                    frames = read_frames_at(video, indices, size, cfg.decode_threads, reader)
                else:
                    frames = read_frames(reader, indices)
                augmented = [
                    self.augment(frames, target, rng if r == 0 else sample_rng(self.seed, epoch, key, r))
                    for r in range(self.repeats)
                ]
                if self.repeats == 1:
                    return augmented[0]
                return torch.stack([clip for clip, _ in augmented]), [label for _, label in augmented]
            indices = np.concatenate(
                [
                    segment_indices(total, cfg.num_frames, clip=c, clips=cfg.eval_clips)
                    for c in range(cfg.eval_clips)
                ]
            )
            frames = read_frames(reader, indices)
            frames = frames.reshape(cfg.eval_clips, cfg.num_frames, *frames.shape[1:])  # (clips, T, H, W, 3)
        except VideoDecodeError as exc:
            raise SkipSample("decode_error", str(exc)) from exc
        boxes = crop_boxes(*frames.shape[2:4], cfg.eval_crops)
        views = [crop_resize(clip_frames, box, self.size) for clip_frames in frames for box in boxes]
        return torch.stack(views), target

    def augment(self, frames: np.ndarray, target, rng: np.random.Generator) -> tuple[torch.Tensor, object]:
        """One training clip of decoded (T, H, W, 3) frames and its target, flipped (label too) or not.

        CPU path: random-resized crop, flip, RandAugment -> (T, 3, S, S). Device path: the flip only ->
        (T, 3, H, W); the device crops after it, which is mirror-symmetric in distribution, so flipping
        first draws the same clips.
        """
        cfg = self.cfg
        if cfg.augment_on == "device":
            clip = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
        else:
            box = random_resized_crop_box(
                *frames.shape[1:3], rng, tuple(cfg.train_scale), tuple(cfg.train_ratio)
            )
            clip = crop_resize(frames, box, self.size)
        if cfg.hflip and rng.random() < 0.5:
            clip = clip.flip(-1)
            if self.flip_map:
                target = self.flip_map.get(target, target)
        if self.randaugment is not None:
            clip = self.randaugment(clip, rng)
        return clip, target


def shuffled(items: Iterator, buffer: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle with a bounded buffer."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


class VideoShards(IterableDataset):
    """Batches of decoded clips from tar shards, split across ranks and workers (see module docstring).

    Args:
        urls: shard URLs (local paths or fsspec URLs).
        resume: slot -> {"epoch", "position", "skips"} saved from an earlier run of the same layout.
        worker_offset: rotates which slot each worker plays, so a resumed loader keeps the round-robin
            order of the interrupted one (see ``Trainer``).
    """

    def __init__(
        self,
        urls: list[str],
        decoder: VideoClipDecoder,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        resume: dict[int, dict] | None = None,
        worker_offset: int = 0,
        max_skip_fraction: float = 1.0,
        allow_pipe: bool = False,
    ):
        super().__init__()
        self.max_skip_fraction, self.allow_pipe = max_skip_fraction, allow_pipe
        self.urls, self.decoder, self.batch_size, self.train, self.seed = (
            urls,
            decoder,
            batch_size,
            train,
            seed,
        )
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.resume = resume or {}
        self.worker_offset = worker_offset
        self.repeats = getattr(decoder, "repeats", 1)  # clips per sample (>1: a list of targets too)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + (worker + self.worker_offset) % workers, self.world_size * workers

    def _raw_samples(self, urls: list[str], skips: Counter) -> Iterator[dict]:
        for url in urls:
            reported = []

            def broken(exc: Exception, url=url, reported=reported) -> bool:
                # webdataset reports one tar error at the member and again at the shard: count the shard once.
                if not reported:
                    reported.append(exc)
                    skips["broken_shard"] += 1
                    _warn(skips, "broken_shard", f"{url}: {type(exc).__name__}: {str(exc.args[0])[:200]}")
                return True

            try:
                stream = open_shard(url, self.allow_pipe)
            except DataError:
                raise
            except Exception as exc:
                skips["unreachable_shard"] += 1
                _warn(skips, "unreachable_shard", f"{url}: {exc}")
                continue
            with stream:
                yield from group_by_keys(
                    tar_file_expander([{"url": url, "stream": stream}], handler=broken), handler=broken
                )

    def _epoch_samples(self, epoch: int, slot: int, slots: int, skips: Counter) -> Iterator[dict]:
        urls = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(urls)
        if len(urls) >= slots:
            samples = self._raw_samples(urls[slot::slots], skips)
        else:
            samples = (s for i, s in enumerate(self._raw_samples(urls, skips)) if i % slots == slot)
        if self.train and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, slot]))
        return samples

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._slot()
        state = self.resume.get(slot, {})
        epoch, skip = state.get("epoch", 0), state.get("position", 0)
        skips = Counter(state.get("skips", {}))
        seen = state.get("seen", 0)  # samples read (used or skipped) by this slot, over all epochs
        clips, targets, keys = [], [], []
        batch = self.decoder.collate
        while True:
            position = used = 0
            for sample in self._epoch_samples(epoch, slot, slots, skips):
                position += 1
                if position <= skip:
                    continue
                seen += 1
                try:
                    clip, target = self.decoder(sample, epoch)
                except SkipSample as exc:
                    skips[exc.kind] += 1
                    _warn(skips, exc.kind, f"{sample.get('__key__')} in {sample.get('__url__')}: {exc}")
                    self._check_skip_rate(slot, seen, skips)
                    continue
                used += 1
                if self.repeats > 1:
                    clips.extend(clip)
                    targets.extend(target)
                else:
                    clips.append(clip)
                    targets.append(target)
                keys.append(sample["__key__"])
                if len(keys) == self.batch_size:
                    yield _batch(clips, batch(targets), keys, slot, epoch, position, seen, skips)
                    clips, targets, keys = [], [], []
            if not self.train:
                break
            if used == 0 and skip == 0:
                more = f" and {len(self.urls) - 3} more" if len(self.urls) > 3 else ""
                shown = ", ".join(self.urls[:3]) + more
                raise DataError(
                    f"slot {slot}: a whole epoch of {shown} gave no usable sample (skipped: {dict(skips)})"
                )
            epoch, skip = epoch + 1, 0
        if clips or skips:  # evaluation: the last batch carries the final skip counts, even without clips
            yield _batch(clips, batch(targets), keys, slot, epoch, position, seen, skips)

    def _check_skip_rate(self, slot: int, seen: int, skips: Counter) -> None:
        bad = sum(n for kind, n in skips.items() if kind not in SHARD_SKIPS)
        if seen >= SKIP_CHECK_AFTER and bad > self.max_skip_fraction * seen:
            raise DataError(
                f"slot {slot} skipped {bad} of its {seen} samples ({bad / seen:.0%}), more than "
                f"data.max_skip_fraction={self.max_skip_fraction}: the data looks broken. "
                f"Skipped by kind: {dict(skips)}; the first of each kind are logged above."
            )


def _warn(skips: Counter, kind: str, message: str) -> None:
    if skips[kind] <= WARN_LIMIT:
        suffix = " (further ones are only counted)" if skips[kind] == WARN_LIMIT else ""
        log.warning("skipped sample: %s: %s%s", kind, message, suffix)


def _batch(clips, targets: dict, keys, slot, epoch, position, seen, skips) -> dict:
    return {
        # (B*R, T, 3, S, S) in training (R = data.repeats, video after video) or (B, V, T, 3, S, S), uint8
        "frames": torch.stack(clips) if clips else None,
        **targets,  # "labels" (B*R,), or the captions' "text_ids", "text_mask", ...
        "keys": list(keys),  # (B,): one per video
        "slot": slot,
        "state": {"epoch": epoch, "position": position, "seen": seen, "skips": dict(skips)},
    }


def build_loader(
    cfg: DataConfig,
    image_size: int,
    target,
    train: bool,
    seed: int,
    rank: int,
    world_size: int,
    resume: dict[int, dict] | None = None,
    worker_offset: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """The training (endless) or evaluation (one pass) loader of one rank.

    ``target``: the number of classes (recognition) or a target object such as ``CaptionTarget``.
    """
    urls = expand_shards(cfg.train_shards if train else cfg.eval_shards, cfg.allow_pipe)
    decoder = VideoClipDecoder(cfg, image_size, target, train, seed)
    batch_size = cfg.batch_size if train else cfg.eval_batch_size
    return shard_loader(
        cfg, urls, decoder, batch_size, train, seed, rank, world_size, resume, worker_offset, worker_init_fn
    )


def shard_loader(
    cfg: DataConfig,
    urls: list[str],
    decoder,
    batch_size: int,
    train: bool,
    seed: int,
    rank: int,
    world_size: int,
    resume: dict[int, dict] | None = None,
    worker_offset: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """One rank's DataLoader over a ``VideoShards`` of ``urls`` and ``decoder`` (which batches itself)."""
    dataset = VideoShards(
        urls,
        decoder,
        batch_size,
        train,
        seed,
        rank,
        world_size,
        cfg.shuffle_buffer,
        resume,
        worker_offset,
        cfg.max_skip_fraction,
        cfg.allow_pipe,
    )
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_init_fn if workers else None,
    )
