"""BEVT: the shared Video Swin (image stream = temporal-distance-0 slice, inflation), decoders, masked loss,
and end-to-end pretraining runs through the trainer (stage 1 -> stage 2 -> fine-tuning; 2 ranks, resume)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.bevt import BEVT
from models.swin3d import (
    SWIN_SIZES,
    SwinConfig,
    SwinRecognizer,
    VideoSwin,
    build_swin,
    inflate_image_weights,
    load_encoder_weights,
    window_for,
)
from tests.conftest import launch, records

SHAPE = SWIN_SIZES["test"]  # embed 16, depths 1-1-2-1, window (2, 4, 4), patch (2, 4, 4)
SIZE = 64  # stage grids 16, 8, 4, 2: the stage-3 grid (4x4) is the target grid


def encoder(seed: int = 0, **kwargs) -> VideoSwin:
    torch.manual_seed(seed)
    return VideoSwin(SHAPE, **kwargs).eval()


def bevt(seed: int = 0, norms: str = "released") -> BEVT:
    """BEVT at the test shape: its encoder has no final norm (released) or norms stages 3-4 (encoder)."""
    return BEVT(encoder(seed, norms=norms, final_norm=False), vocab_size=16, decoder_dim=24)


def test_swin_b_has_the_published_shape():
    with torch.device("meta"):
        model = build_swin(SwinConfig(name="base", image_size=224))
    params = sum(p.numel() for p in model.parameters())
    assert 87e6 < params < 89e6  # Video Swin-B: 88M
    assert model.shape.patch == (2, 4, 4) and model.shape.window == (8, 7, 7) and model.dims[-1] == 1024
    assert model.stride == 16  # one target cell = 16 x 16 px: 14 x 14 at 224 px


def test_image_stream_bias_is_the_temporal_distance_zero_slice():
    attention = encoder().layers[0].blocks[0].attn
    wt, wh, ww = SHAPE.window
    video = attention.relative_bias((wt, wh, ww)).view(-1, wt, wh * ww, wt, wh * ww)  # (heads, t, n, t', n')
    image = attention.relative_bias((1, wh, ww))  # (heads, n, n)
    for t in range(wt):
        torch.testing.assert_close(video[:, t, :, t], image, rtol=0, atol=0)
    assert not torch.equal(video[:, 0, :, 1], image)  # other temporal distances are other table rows
    # an image is one temporal slot: its windows are 2D, (1, Wh, Ww), and never shifted in time
    assert window_for((1, 16, 16), SHAPE.window, (1, 2, 2)) == ((1, 4, 4), (0, 2, 2))


@pytest.mark.parametrize("frames", [4, 8])  # 2 slots = the temporal window; 4 slots = shifted 3D windows
def test_inflated_image_weights_reproduce_the_image_model_on_a_repeated_frame(frames):
    image_model = encoder(0)
    state = image_model.state_dict()
    # a 2D checkpoint: the image patch embedding under Swin's name, 2D bias tables (the dt = 0 slices)
    wt, wh, ww = SHAPE.window
    plane = (2 * wh - 1) * (2 * ww - 1)
    two_d = {k: v for k, v in state.items() if not k.startswith(("patch_embed.proj", "patch_embed.norm"))}
    for part in ("weight", "bias"):
        two_d[f"patch_embed.proj.{part}"] = state[f"patch_embed.proj2d.{part}"]
        two_d[f"patch_embed.norm.{part}"] = state[f"patch_embed.norm2d.{part}"]
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            two_d[key] = value.view(2 * wt - 1, plane, -1)[wt - 1]
    video_model = encoder(1)
    video_model.load_state_dict(inflate_image_weights(two_d, video_model, prefix="")[0])

    frame = torch.randn(2, 3, SIZE, SIZE)
    clip = frame.unsqueeze(2).expand(2, 3, frames, SIZE, SIZE)  # one frame repeated
    with torch.no_grad():
        image_out, video_out = image_model(frame), video_model(clip)
    for image_stage, video_stage in zip(image_out, video_out, strict=True):
        assert video_stage.shape[1] == frames // SHAPE.patch[0]
        # every temporal slot equals the image (the kernel was divided by its temporal size)
        torch.testing.assert_close(video_stage, image_stage.expand_as(video_stage), rtol=1e-4, atol=1e-4)


def bevt_batches(model: BEVT, batch: int = 2, frames: int = 4, vocab: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = SIZE // model.encoder.stride
    images = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    video = torch.randn(batch, 3, frames, SIZE, SIZE, generator=g)
    image_mask = torch.rand(batch, grid, grid, generator=g) < 0.5
    video_mask = torch.rand(batch, frames // 2, grid, grid, generator=g) < 0.4
    return {
        "image": (images, image_mask, torch.randint(vocab, (batch, grid, grid), generator=g)),
        "video": (video, video_mask, torch.randint(vocab, (batch, frames, grid, grid), generator=g)),
    }


@pytest.mark.parametrize("norms", ["released", "encoder"])
def test_every_shared_weight_gets_gradients_from_both_streams(norms):
    model = bevt(norms=norms)
    batches = bevt_batches(model)
    grads = {}
    for name in ("image", "video"):
        model.zero_grad()
        loss, _ = model({name: batches[name]}, {name: 1.0})
        loss.backward()
        grads[name] = {
            k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
    own = {  # released norms: each stream's patch-embedding norm is its own
        "image": ("patch_embed.proj2d", "patch_embed.norm2d", "decoders.image"),
        "video": (
            "patch_embed.proj.",
            "decoders.video",
            *(("patch_embed.norm.",) if norms == "released" else ()),
        ),
    }
    everything = {k for k, _ in model.named_parameters()}
    shared = {k for k in everything if not any(part in k for parts in own.values() for part in parts)}
    assert "encoder.mask_token" in shared and "head.weight" in shared
    assert ("decoder_norm.weight" in shared) == (norms == "released")
    assert ("encoder.norm3.weight" in shared) == (norms == "encoder")
    assert any(k.endswith("relative_position_bias_table") for k in shared)
    for name in ("image", "video"):
        assert shared <= grads[name], (
            f"{name} stream leaves {sorted(shared - grads[name])[:5]} without gradient"
        )
        other = "video" if name == "image" else "image"
        assert not any(part in k for k in grads[name] for part in own[other])  # the other stream's own parts


def test_released_norms_feed_the_decoders_raw_stages():
    model = bevt().eval()  # the decoders' shared norm: see the gradient test (both streams reach it)
    assert model.encoder.norm is None and model.encoder.norm3 is None
    assert all(decoder.norm is None for decoder in model.decoders.values())
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens, stages = model.encoder.patch_embed(images), []
        for stage in model.encoder.layers:
            for block in stage.blocks:
                tokens = block(tokens)
            stages.append(tokens)
            if stage.downsample is not None:
                tokens = stage.downsample(tokens)
        for got, want in zip(model.encoder(images), stages, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="final_norm=False"):
        BEVT(encoder(), vocab_size=16, decoder_dim=24)


def test_loss_counts_masked_cells_only():
    model = bevt().eval()
    batches = bevt_batches(model)
    for name in ("image", "video"):
        inputs, mask, targets = batches[name]
        with torch.no_grad():
            loss, results = model({name: (inputs, mask, targets)}, {name: 1.0})
            frame_mask = mask if name == "image" else mask.repeat_interleave(2, 1)
            changed = torch.where(frame_mask, targets, (targets + 1) % 16)  # only unmasked targets change
            loss2, _ = model({name: (inputs, mask, changed)}, {name: 1.0})
        torch.testing.assert_close(loss, loss2)
        assert results[name]["masked"] == frame_mask.sum()
        assert 0 <= results[name]["correct"] <= results[name]["masked"]


def test_grid_mismatch_is_a_clear_error():
    model = bevt()
    images, mask, _ = bevt_batches(model)["image"]
    with pytest.raises(ValueError, match="same grid"):
        model({"image": (images, mask, torch.zeros(2, 3, 3, dtype=torch.long))}, {"image": 1.0})


def test_encoder_weights_move_between_pretraining_and_recognition():
    pretrained = bevt(0)
    recognizer = SwinRecognizer(encoder(1), num_classes=5)
    note = load_encoder_weights(recognizer, pretrained.state_dict())
    for key, value in pretrained.encoder.state_dict().items():
        torch.testing.assert_close(recognizer.encoder.state_dict()[key], value)
    assert "initialised afresh: [encoder.norm, head]" in note  # the decoders' norm is 24 wide, stage 4 128
    assert "[decoder_norm, decoders] (this model has none)" in note
    # a bare 2D Swin encoder checkpoint (keys without "encoder.", 4-D patch kernel) is inflated on the way
    bare = {k: v for k, v in encoder(2).state_dict().items() if not k.startswith("patch_embed.proj.")}
    bare["patch_embed.proj.weight"] = bare.pop("patch_embed.proj2d.weight")
    bare["patch_embed.proj.bias"] = bare.pop("patch_embed.proj2d.bias")
    del bare["patch_embed.norm2d.weight"], bare["patch_embed.norm2d.bias"]
    note = load_encoder_weights(recognizer, bare)
    assert "inflated" in note
    kernel = recognizer.encoder.patch_embed.proj.weight
    torch.testing.assert_close(kernel.sum(2), bare["patch_embed.proj.weight"])
    wrong = VideoSwin(SWIN_SIZES["demo"]).state_dict()
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder_weights(recognizer, wrong)


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bevt_data(tiny_shards, tmp_path_factory) -> dict:
    """Tiny image shards beside the tiny video shards; a k-means tokenizer over the tiny ViT (4x4 codes)."""
    from data.synthetic import synthetic_images
    from data.writer import write_shards

    out = tmp_path_factory.mktemp("bevt")
    write_shards(synthetic_images(24, seed=0, size=32, prefix="train"), out / "images", "train", max_count=12)
    write_shards(synthetic_images(24, seed=1, size=32, prefix="test"), out / "images", "test")
    codebook = out / "kmeans.pt"
    args = [
        "--shards",
        str(tiny_shards / "train-{000000..000002}.tar"),
        "--backbone",
        "tiny",
        "--codes",
        "16",
    ]
    args += ["--clips", "12", "--frames", "2", "--workers", "0", "--out", str(codebook)]
    result = launch(args, script="launch/fit_tokenizer.py", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {"videos": tiny_shards, "images": out / "images", "codebook": codebook}


def bevt_overrides(data: dict, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "task": "bevt",
        "model": "video_swin",
        "swin.name": "test",
        "swin.image_size": SIZE,
        "swin.drop_path": 0.0,
        "bevt.stage": "joint",
        "bevt.decoder_dim": 128,  # stage 4's width, as released: its shared norm becomes the final norm
        "bevt.mask.min_block": 2,
        "bevt.mask.tube_min": 1,
        "bevt.mask.tube_max": 2,
        "bevt.tokenizer.kind": "kmeans",
        "bevt.tokenizer.path": str(data["codebook"]),
        "data.train_shards": str(data["videos"] / "train-{000000..000002}.tar"),
        "data.eval_shards": str(data["videos"] / "test-{000000..000001}.tar"),
        "data.image_shards": str(data["images"] / "train-{000000..000001}.tar"),
        "data.image_eval_shards": str(data["images"] / "test-000000.tar"),
        "data.num_frames": 4,
        "data.batch_size": 2,
        "data.image_batch_size": 4,
        "data.eval_batch_size": 4,
        "data.num_workers": 0,
        "data.shuffle_buffer": 4,
        "train.steps": 4,
        "optim.warmup_steps": 1,
        "metrics.log_every": 1,
        "metrics.progress_bar": False,
        "metrics.tensorboard": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_two_stage_pretraining_then_fine_tuning(bevt_data, tmp_path):
    stage1 = tmp_path / "stage1"
    result = launch(bevt_overrides(bevt_data, stage1, **{"bevt.stage": "image", "train.steps": 3}))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in records(stage1) if "image/masked_acc" in r]
    assert logged and all("video/masked_acc" not in r for r in logged)  # stage 1: the image stream alone
    final = json.loads((stage1 / "eval.json").read_text())
    assert final["stage"] == "image" and final["image_masked_cells"] > 0 and "video_masked_acc" not in final

    stage2 = tmp_path / "stage2"
    result = launch(bevt_overrides(bevt_data, stage2, **{"swin.init_from": stage1, "swin.inflate": True}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image weights inflated" in result.stdout
    logged = [r for r in records(stage2) if "video/masked_acc" in r]
    assert logged and all(0 <= r["video/masked_acc"] <= 1 and "image/masked_acc" in r for r in logged)
    final = json.loads((stage2 / "eval.json").read_text())
    for name in ("image", "video"):
        assert final[f"{name}_masked_cells"] > 0 and 0 <= final[f"{name}_masked_acc"] <= 1
    assert final["chance"] == 1 / 16

    finetune = tmp_path / "finetune"
    args = bevt_overrides(bevt_data, finetune, **{"task": "recognition", "swin.init_from": stage2})
    result = launch([*args, "swin.num_classes=8", "train.steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top1" in json.loads((finetune / "eval.json").read_text())
    assert "[decoders] (this model has none)" in result.stdout  # the pretraining decoders were left behind
    assert "the final norm from the norm the decoders share" in result.stdout


def test_short_two_stage_pretraining_learns_both_streams(bevt_data, tmp_path):
    """Stage 1 then stage 2, briefly: masked-token accuracy on held-out data beats 5 x chance (1 / codes) and
    the majority code on both streams."""
    common = {"optim.lr": 2e-3, "train.steps": 150, "optim.warmup_steps": 10, "metrics.log_every": 50}
    stage1 = tmp_path / "stage1"
    result = launch(bevt_overrides(bevt_data, stage1, **common, **{"bevt.stage": "image"}))
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = tmp_path / "stage2"
    joint = {"swin.init_from": stage1, "swin.inflate": True, "train.steps": 300}
    result = launch(bevt_overrides(bevt_data, stage2, **{**common, **joint}))
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((stage2 / "eval.json").read_text())
    for name in ("image", "video"):
        assert final[f"{name}_masked_acc"] >= 5 * final["chance"], json.dumps(final)
        assert final[f"{name}_masked_acc"] > final[f"{name}_majority_acc"], final


def test_stage2_on_two_ranks_completes_and_resumes(bevt_data, tmp_path):
    """Stage 2 on 2 ranks with the tokenizer partitioned by ZeRO-3 inference (the frozen backbone's
    machinery), interrupted after 2 steps and resumed to 4; with the project's earlier norms and per-block
    tubes (the options beside the released ones)."""
    run_dir = tmp_path / "run"
    zero3 = {"train.frozen_deepspeed_config": "deepspeed_configs/frozen_zero3.json"}
    zero3.update({"bevt.norms": "encoder", "bevt.mask.video": "per_block"})
    args = bevt_overrides(bevt_data, run_dir, **{"train.steps": 2, "checkpoint.every": 2}, **zero3)
    result = launch(args, ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kmeans tokenizer (ZeRO-3 partitioned)" in result.stdout
    state = json.loads((run_dir / "checkpoints" / "step00000002" / "train_state_rank00001.json").read_text())
    assert state["image_batches_seen"] == 2 and state["batches_seen"] == 2 and state["image_data"]
    result = launch([*args, "train.steps=4"], ranks=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    steps = [r["step"] for r in records(run_dir) if "video/masked_acc" in r]
    assert steps[-2:] == [3, 4]
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 4


def test_bevt_config_errors_are_one_line(bevt_data, tmp_path):
    cases = {
        "model=side4video": "model: BEVT pretrains a Video Swin",
        "data.image_shards=null": "data.image_shards",
        "bevt.tokenizer.path=/nonexistent.pt": "bevt.tokenizer.path",
        "swin.image_size=96": "grid",  # a 6x6 stage-3 grid against the tokenizer's 4x4 codes
        "bevt.stage=video": "bevt.stage",
        "bevt.norms=shared": "bevt.norms",
        "bevt.mask.video=tubes": "bevt.mask.video",
        "swin.init_from=/nonexistent": "swin.init_from: /nonexistent does not exist",
        f"swin.init_from={bevt_data['codebook']}": "swin.init_from",  # not a model's weights
        "swin.name=demo": "grid",
    }
    with ThreadPoolExecutor(2) as pool:  # two runs at a time: each is mostly its interpreter's start-up
        results = pool.map(
            lambda case: launch([*bevt_overrides(bevt_data, tmp_path / f"bad{case[0]}"), case[1]]),
            enumerate(cases),
        )
        for (override, message), result in zip(cases.items(), results, strict=True):
            assert result.returncode == 2, (override, result.stderr[-2000:])
            assert message in result.stderr and "Traceback" not in result.stderr, (
                override,
                result.stderr[-2000:],
            )
