"""The shard pipeline under faults and from remote storage: a fuzz of broken input, the skip-rate ceiling,
shards over HTTP through fsspec, and pipe: URLs refused unless enabled."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from data.shards import DataConfig, DataError, VideoClipDecoder, VideoShards, expand_shards
from data.synthetic import synthetic_samples
from tests.conftest import TINY_FRAMES, TINY_SIZE

NUM_CLASSES = 8


def eval_decoder(**extra) -> VideoClipDecoder:
    cfg = DataConfig(num_frames=TINY_FRAMES, eval_batch_size=3, **extra)
    return VideoClipDecoder(cfg, TINY_SIZE, NUM_CLASSES, train=False, seed=0)


def read_all(urls: list[str], ranks: int, workers: int, decoder=None, **options) -> tuple[list[str], Counter]:
    """Every key delivered and the skips counted, over ``ranks`` x ``workers`` slots, one evaluation pass."""
    keys, skips = [], Counter()
    for rank in range(ranks):
        dataset = VideoShards(urls, decoder or eval_decoder(), 3, False, 0, rank, ranks, **options)
        last: dict[int, dict] = {}
        for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
            keys += batch["keys"]
            last[batch["slot"]] = batch["state"]["skips"]  # cumulative per slot
        for counts in last.values():
            skips.update(counts)
    return keys, skips


@functools.cache
def good_videos() -> list[tuple[str, bytes, int]]:
    return [(key, video, label) for key, _, video, label, _ in synthetic_samples(16, 1, TINY_SIZE, 8, "good")]


@functools.cache
def short_video() -> bytes:
    return next(synthetic_samples(1, 2, TINY_SIZE, 2, "short"))[2]  # 2 frames < TINY_FRAMES


def broken_sample(kind: str, index: int, rng: np.random.Generator) -> tuple[dict, str]:
    """A sample broken in the way ``kind`` says, and the skip kind the pipeline must count it as."""
    _, video, label = good_videos()[index % len(good_videos())]
    key, cls = f"bad{kind}{index:05d}", str(label).encode()
    samples = {
        "truncated": ({"mp4": video[: len(video) // 2], "cls": cls}, "decode_error"),
        "corrupt": ({"mp4": rng.bytes(len(video)), "cls": cls}, "decode_error"),
        "zero_bytes": ({"mp4": b"", "cls": cls}, "decode_error"),
        "not_video": ({"mp4": b"<html>not a video</html>", "cls": cls}, "decode_error"),
        "no_label": ({"mp4": video}, "missing_label"),
        "text_label": ({"mp4": video, "cls": b"walking"}, "bad_label"),
        "label_out_of_range": ({"mp4": video, "cls": b"999"}, "bad_label"),
        "no_video": ({"cls": cls, "json": b"{}"}, "missing_video"),
        "too_short": ({"mp4": short_video(), "cls": cls}, "too_few_frames"),
    }
    sample, expected = samples[kind]
    return {"__key__": key, **sample}, expected


BROKEN_KINDS = ("truncated", "corrupt", "zero_bytes", "not_video", "no_label", "text_label",
                "label_out_of_range", "no_video", "too_short")  # fmt: skip


def test_fuzzed_shards_deliver_every_good_sample_once_and_count_every_bad_one(tmp_path):
    rng = np.random.default_rng(0)
    planted, good_keys, urls = Counter(), [], []
    samples = [("good", i) for i in range(48)] + [("bad", i) for i in range(216)]
    rng.shuffle(samples)
    for shard, part in enumerate(np.array_split(np.arange(len(samples)), 5)):  # 5 shards, ~53 samples each
        url = tmp_path / f"fuzz-{shard:06d}.tar"
        with wds.TarWriter(str(url)) as sink:
            for what, i in (samples[j] for j in part):
                if what == "good":
                    key, video, label = good_videos()[i % 16]
                    key = f"good{i:05d}"
                    sink.write({"__key__": key, "mp4": video, "cls": str(label).encode()})
                    good_keys.append(key)
                else:
                    sample, expected = broken_sample(BROKEN_KINDS[rng.integers(len(BROKEN_KINDS))], i, rng)
                    sink.write(sample)
                    planted[expected] += 1
        urls.append(str(url))
    (tmp_path / "fuzz-broken.tar").write_bytes(rng.bytes(30_000))  # not a tar at all
    urls += [str(tmp_path / "fuzz-broken.tar"), "file:///nonexistent/fuzz-000009.tar"]
    planted.update(broken_shard=1, unreachable_shard=1)
    assert sum(planted.values()) >= 200 + 2

    keys, skips = read_all(urls, ranks=2, workers=2)
    assert sorted(keys) == sorted(good_keys)  # every good sample exactly once over 2 ranks x 2 workers
    assert skips == planted


def test_mostly_broken_data_stops_with_one_clear_error(tmp_path):
    url = tmp_path / "broken-000000.tar"
    with wds.TarWriter(str(url)) as sink:
        for i in range(120):
            if i % 2:
                _, video, label = good_videos()[i % 16]
                sink.write({"__key__": f"good{i:05d}", "mp4": video, "cls": str(label).encode()})
            else:
                sink.write({"__key__": f"bad{i:05d}", "mp4": b"junk", "cls": b"1"})
    with pytest.raises(DataError, match=r"skipped 51 of its 101 samples .*max_skip_fraction=0.3"):
        read_all([str(url)], ranks=1, workers=0, max_skip_fraction=0.3)
    keys, skips = read_all([str(url)], ranks=1, workers=0, max_skip_fraction=0.6)  # within the ceiling
    assert len(keys) == 60 and skips == {"decode_error": 60}


def test_shards_are_read_over_http_with_brace_patterns(tiny_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        urls = expand_shards(f"{base}/test-{{000000..000001}}.tar::{base}/missing-000000.tar")
        keys, skips = read_all(urls, ranks=1, workers=2)
        local, _ = read_all(expand_shards(str(tiny_shards / "test-{000000..000001}.tar")), 1, 0)
        assert sorted(keys) == sorted(local) and len(keys) == 12
        assert skips == {"unreachable_shard": 1}  # the 404
    finally:
        server.shutdown()


def test_pipe_urls_run_only_when_allowed(tiny_shards):
    spec = f"pipe:cat {tiny_shards / 'test-000000.tar'}"
    with pytest.raises(DataError, match="allow_pipe"):
        expand_shards(spec)
    with pytest.raises(DataError, match="allow_pipe"):  # and never by a loader built without the flag
        read_all([spec], ranks=1, workers=0)
    keys, skips = read_all(expand_shards(spec, allow_pipe=True), 1, 0, allow_pipe=True)
    assert len(keys) == 6 and not skips


def test_data_config_rejects_a_bad_skip_ceiling():
    with pytest.raises(ValueError, match="max_skip_fraction"):
        DataConfig(max_skip_fraction=1.5)
