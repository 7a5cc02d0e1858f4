"""Text-video retrieval: captions and the local tokenizer, the frozen text encoder and output head loaded from
a CLIP directory, the zero-initialised head, metrics, the gathered loss on 2 ranks, and runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from data.captions import CaptionTarget, load_tokenizer, parse_captions, tokenize, write_bpe_tokenizer
from data.shards import DataConfig, SkipSample, VideoClipDecoder, build_loader
from data.synthetic import caption_corpus, describe, retrieval_samples
from data.writer import write_shards
from models import (
    BackboneConfig,
    SideConfig,
    TextConfig,
    build_backbone,
    build_retrieval_network,
    build_text_encoder,
)
from tests.conftest import TINY_FRAMES, TINY_SIZE, launch, records, tiny_overrides
from trainer import retrieval
from trainer.retrieval import retrieval_metrics, score_in_chunks

TEST_VIDEOS = 11  # split 6 + 5 across two shards, so two ranks hold different numbers


@pytest.fixture(scope="module")
def retrieval_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval")
    write_shards(
        retrieval_samples(16, seed=0, size=TINY_SIZE, frames=8, prefix="train"), out, "train", max_count=8
    )
    write_shards(
        retrieval_samples(TEST_VIDEOS, seed=1, size=TINY_SIZE, frames=8, prefix="test"),
        out,
        "test",
        max_count=6,
    )
    write_bpe_tokenizer(caption_corpus(), out / "tokenizer")
    return out


def retrieval_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "task": "retrieval",
        "text.name": "tiny",
        "text.random_token_std": 1.0,
        "data.train_shards": str(shards / "train-{000000..000001}.tar"),
        "data.eval_shards": str(shards / "test-{000000..000001}.tar"),
        "data.tokenizer": str(shards / "tokenizer"),
        "data.max_words": 12,
        **extra,
    }
    return tiny_overrides(shards, run_dir, **values)


# -- captions and tokenizer ----------------------------------------------------------------------------------


def test_local_bpe_tokenizer_reads_as_clip_tokenizer(tmp_path):
    tokenizer = load_tokenizer(str(write_bpe_tokenizer(caption_corpus(), tmp_path)))
    caption = describe("red", "circle", "left", "slowly")[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "moves</w>", "to</w>", "the</w>",
                      "left</w>", "slowly</w>", "<|endoftext|>"]  # fmt: skip
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [
        len(tokenizer) - 2,
        len(tokenizer) - 1,
    ]
    ids, mask = tokenize(tokenizer, [caption, "unseen words split into pieces"], 6)
    assert ids.shape == (2, 6) and ids[0, -1] == len(tokenizer) - 1  # cut, the end token kept
    assert mask.sum(1).tolist() == [6, 6]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(None, "missing_caption"), (b"{not json", "bad_caption"), (b'{"motion": "left"}', "missing_caption"),
     (b'{"captions": ["  ", ""]}', "missing_caption"), (b'{"captions": [3]}', "missing_caption")],
)  # fmt: skip
def test_bad_captions_are_counted_skips(raw, kind):
    with pytest.raises(SkipSample) as info:
        parse_captions(raw)
    assert info.value.kind == kind


def test_captions_one_per_video_in_training_all_in_evaluation(retrieval_shards):
    cfg = DataConfig(num_frames=TINY_FRAMES, batch_size=4, eval_batch_size=4, num_workers=0)
    tokenizer = str(retrieval_shards / "tokenizer")
    cfg.eval_shards = str(retrieval_shards / "test-{000000..000001}.tar")
    cfg.train_shards = str(retrieval_shards / "train-{000000..000001}.tar")
    train = next(iter(build_loader(cfg, TINY_SIZE, CaptionTarget(tokenizer, 12, True), True, 0, 0, 1)))
    assert train["text_ids"].shape == (4, 12) and train["text_mask"].shape == (4, 12)
    batches = list(build_loader(cfg, TINY_SIZE, CaptionTarget(tokenizer, 12, False), False, 0, 0, 1))
    counts = [len(b["text_ids"]) for b in batches if b["keys"]]
    assert sum(counts) == 3 * TEST_VIDEOS
    first = batches[0]
    assert first["text_video"].tolist()[:6] == [0, 0, 0, 1, 1, 1] and first["text_index"].tolist()[:3] == [
        0,
        1,
        2,
    ]
    # The training caption is drawn per (seed, epoch, key): the same sample gets the same caption again.
    target = VideoClipDecoder(cfg, TINY_SIZE, CaptionTarget(tokenizer, 12, True), True, 0).target
    raw = {"__key__": "k", "json": json.dumps({"captions": ["a", "b c", "d e f"]}).encode()}
    picks = [target(raw, np.random.default_rng(seed))["mask"].sum().item() for seed in range(20)]
    assert set(picks) == {3, 4, 5}  # start + words + end: every caption gets drawn
    again = [target(raw, np.random.default_rng(seed))["mask"].sum().item() for seed in range(20)]
    assert again == picks


# -- model ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A transformers CLIPModel with random weights and the tiny shapes, saved as a local directory."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "vocab_size": 60, "bos_token_id": 58, "eos_token_id": 59,
                     "pad_token_id": 59},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "patch_size": 8, "image_size": 32},
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config)
    for param in model.parameters():  # away from the init's special values (unit norms, zero biases)
        param.data.add_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(out)
    return out


def test_zero_init_video_embeddings_are_the_frozen_clip_frames(clip_dir):
    """Before training, each frame's embedding is CLIP's image embedding of that frame; the text encoder's
    end-token embedding is CLIP's text embedding. Both towers load from the directory through our loaders."""
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    backbone = build_backbone(BackboneConfig(name="tiny", pretrained=str(clip_dir)), projection=True)
    model = build_retrieval_network(SideConfig(width=32), backbone)
    model.output.copy_from(*backbone.output_head())
    frames = torch.randn(2, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        video = model.train()(frames, backbone(frames.flatten(0, 1)))  # (B, T, E)
        expected = clip.get_image_features(pixel_values=frames.flatten(0, 1))
        expected = getattr(expected, "pooler_output", expected).view(2, TINY_FRAMES, -1)
    torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)

    text_encoder = build_text_encoder(TextConfig(pretrained=str(clip_dir)), 16, 60)
    ids = torch.tensor([[58, 5, 9, 59, 59], [58, 7, 59, 59, 59]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        tokens = text_encoder(ids, mask)  # (2, 5, 16)
        expected = clip.get_text_features(input_ids=ids, attention_mask=mask)
        expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(tokens[[0, 1], [3, 2]], expected, rtol=1e-5, atol=1e-5)


def test_retrieval_needs_the_final_block_tapped():
    backbone = build_backbone(BackboneConfig(name="tiny", tap_layers=[0]), projection=True)
    with pytest.raises(ValueError, match="final block"):
        build_retrieval_network(SideConfig(width=32), backbone)


def test_mean_and_wti_matching_rank_identical_pairs_first():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="tiny"), projection=True)
    for matching in ("wti", "mean"):
        model = build_retrieval_network(SideConfig(width=32, matching=matching), backbone)
        video = torch.randn(5, 4, 16)
        # Each text holds its video's frames as tokens, then their mean as the end token, then padding.
        text = torch.cat([video, F.normalize(video, dim=-1).mean(1, keepdim=True), torch.randn(5, 1, 16)], 1)
        mask = torch.ones(5, 6, dtype=torch.long)
        mask[:, -1] = 0
        sim = model.similarity(video, text, mask)
        assert sim.shape == (5, 5) and sim.argmax(1).tolist() == list(range(5)), matching
        scaled = model.logits(video, text, mask)
        torch.testing.assert_close(scaled, sim * model.logit_scale.exp())
    model.logit_scale.data.fill_(10.0)  # exp(10) > 100: clamped
    torch.testing.assert_close(model.logits(video, text, mask), 100 * model.similarity(video, text, mask))


# -- metrics and chunked scoring -----------------------------------------------------------------------------


def test_retrieval_metrics_multi_caption():
    # 3 videos; captions 0, 1 of video 0, caption 2 of video 1, caption 3 of video 2.
    sim = np.array(
        [
            [0.9, 0.1, 0.2],  # video 0 first: rank 1
            [0.1, 0.5, 0.3],  # video 0 last: rank 3
            [0.3, 0.8, 0.1],  # video 1 first: rank 1
            [0.4, 0.4, 0.4],  # a three-way tie: counts against the match, rank 3
        ]
    )
    text_video = np.array([0, 0, 1, 2])
    m = retrieval_metrics(sim, text_video)
    assert (
        m["t2v_r1"] == 0.5
        and m["t2v_r5"] == 1.0
        and m["t2v_median_rank"] == 2.0
        and m["t2v_mean_rank"] == 2.0
    )
    # Columns: video 0 (its captions 0.9, 0.1 -> best rank 1), video 1 (0.8 -> 1), video 2 (0.4 -> 1).
    assert m["v2t_r1"] == 1.0 and m["v2t_mean_rank"] == 1.0


def test_chunked_scoring_equals_one_block(monkeypatch):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="tiny"), projection=True)
    model = build_retrieval_network(SideConfig(width=32), backbone)
    videos, texts = torch.randn(9, 4, 16), torch.randn(7, 5, 16)
    masks = torch.ones(7, 5, dtype=torch.long)
    whole = model.similarity(videos, texts, masks).detach().numpy()
    monkeypatch.setattr(retrieval, "CHUNK_ELEMENTS", 4 * 5 * 2 * 3)  # blocks of 2 texts x 3 videos or so
    with torch.no_grad():
        chunked = score_in_chunks(model.similarity, videos, texts, masks, torch.device("cpu"))
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


# -- distributed and end to end ------------------------------------------------------------------------------


def test_gathered_loss_and_gradients_equal_one_process(tmp_path):
    result = launch(["--out", str(tmp_path)], ranks=2, script="tests/dist_retrieval.py")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["logits_shape"] == [8, 8]  # the global batch on each rank
        assert abs(r["loss"] - r["loss_reference"]) < 1e-5
        assert r["params_compared"] > 20 and r["max_grad"] > 1e-3
        assert r["max_grad_difference"] < 1e-5 * max(1.0, r["max_grad"])


@pytest.mark.parametrize("frozen", [None, "deepspeed_configs/frozen_zero3_offload_cpu.json"])
def test_retrieval_trains_and_evaluates_every_video_and_caption_once_on_two_ranks(
    retrieval_shards, tmp_path, frozen
):
    """Both frozen towers whole on each rank, or both partitioned by ZeRO-3 with CPU offload."""
    run_dir = tmp_path / "run"
    extra = {"eval.temporal_check": False, "eval.at_start": True}
    if frozen:
        extra["train.frozen_deepspeed_config"] = frozen
    args = retrieval_overrides(retrieval_shards, run_dir, **extra)
    result = launch(args, ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["num_videos"] == TEST_VIDEOS and evaluation["num_captions"] == 3 * TEST_VIDEOS
    assert evaluation["encoded_videos"] == TEST_VIDEOS and evaluation["encoded_captions"] == 3 * TEST_VIDEOS
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10"):
        assert 0 <= evaluation[key] <= 1
    assert 1 <= evaluation["t2v_median_rank"] <= TEST_VIDEOS
    losses = [r["loss"] for r in records(run_dir) if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    untrained = [r for r in records(run_dir) if r["step"] == 0]  # eval.at_start
    assert len(untrained) == 1 and untrained[0]["eval/num_captions"] == 3 * TEST_VIDEOS


def test_retrieval_config_errors(retrieval_shards, tmp_path):
    result = launch([*retrieval_overrides(retrieval_shards, tmp_path / "a"), "data.tokenizer=null"])
    assert result.returncode == 2 and "data.tokenizer" in result.stderr
    result = launch([*retrieval_overrides(retrieval_shards, tmp_path / "b"), "backbone.tap_layers=[0]"])
    assert result.returncode == 2 and "final block" in result.stderr
