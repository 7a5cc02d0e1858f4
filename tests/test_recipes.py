"""The recipes as released (RELEASES.md sections 1 and 2): the flip with swapped left/right labels on both
augmentation paths, repeated augmentation, RandAugment alike on all frames, the train crop, warmup + cosine to
0 in the released configs, and the retrieval head's release details."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data.augment import RANDAUGMENT_OPS, ClipRandAugment, DeviceAugment
from data.shards import DataConfig, Unlabelled, VideoClipDecoder, build_loader
from data.synthetic import encode_mp4
from data.video import random_resized_crop_box
from models import BackboneConfig, Side4Video, SideConfig, build_backbone, build_retrieval_network
from models.retrieval import Side4VideoRetrieval
from tests.conftest import TINY_FRAMES, TINY_SIZE, launch, records, tiny_overrides
from trainer.config import load_config
from trainer.optim import build_optimizer, build_scheduler, warmup_cosine

SSV2_FLIPS = [[86, 87], [93, 94], [166, 167]]
SSV2_CONFIGS = ["ssv2_vitb16", "ssv2_vitl14", "ssv2_vite14", "ssv2_vite14_f16"]
K400_CONFIGS = ["k400_vitb16", "k400_vitl14"]


def data_config(shards, **extra) -> DataConfig:
    values = dict(
        train_shards=str(shards / "train-{000000..000002}.tar"),
        num_frames=TINY_FRAMES,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
    )
    return DataConfig(**{**values, **extra})


# -- the flip and its label swap -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bright_left_video() -> bytes:
    """8 frames of 32 x 64 whose left half is bright and right half dark: a flip shows in the pixels."""
    frames = np.full((8, 32, 64, 3), 20, dtype=np.uint8)
    frames[:, :, :32] = 230
    return encode_mp4(frames)


def bright_side(clip: torch.Tensor) -> str:
    """(T, 3, H, W) -> which half is brighter."""
    half = clip.shape[-1] // 2
    return "left" if clip[..., :half].float().mean() > clip[..., half:].float().mean() else "right"


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_a_flipped_clip_of_a_left_right_class_trains_as_its_mirror_class(bright_left_video, augment_on):
    """Class 86 flipped trains as 87 (94 as 93); class 5 keeps its label, flipped or not. On the device path
    the workers flip before the device's crop: the pixels the model sees and the label agree."""
    # The whole frame as the crop (area 1, the frame's aspect), so that only the flip moves pixels.
    common = dict(num_frames=TINY_FRAMES, hflip=True, flip_label_map=SSV2_FLIPS, train_scale=[1.0, 1.0])
    common["train_ratio"] = [2.0, 2.0]
    if augment_on == "device":
        common.update(augment_on="device", decode_size=[32, 64])
    cfg = DataConfig(**common)
    decoder = VideoClipDecoder(cfg, TINY_SIZE, 174, train=True, seed=0)
    device_augment = DeviceAugment(cfg, TINY_SIZE) if augment_on == "device" else None
    seen = set()
    for label, index in itertools.product((86, 94, 5), range(12)):
        sample = {"__key__": f"v{index}", "mp4": bright_left_video, "cls": str(label).encode()}
        clip, target = decoder(sample, epoch=0)
        if device_augment is not None:
            assert clip.shape == (TINY_FRAMES, 3, 32, 64)  # decoded (and maybe flipped) only
            clip = device_augment(clip[None])[0]
        assert clip.shape == (TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
        flipped = bright_side(clip) == "right"
        mirror = {86: 87, 94: 93, 5: 5}[label]
        assert target == (mirror if flipped else label), (label, index)
        seen.add((label, flipped))
    assert len(seen) == 6  # every class seen both flipped and not


def test_flip_label_map_settings_are_checked():
    with pytest.raises(ValueError, match=r"set data\.hflip=true"):
        DataConfig(flip_label_map=[[86, 87]])
    with pytest.raises(ValueError, match="more than one pair"):
        DataConfig(hflip=True, flip_label_map=[[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="two different classes"):
        DataConfig(hflip=True, flip_label_map=[[4, 4]])
    with pytest.raises(ValueError, match="class 167 of 8 classes"):
        VideoClipDecoder(DataConfig(hflip=True, flip_label_map=SSV2_FLIPS), TINY_SIZE, 8, True, 0)


# -- repeated augmentation -----------------------------------------------------------------------------------


def test_repeats_give_independent_clips_of_each_video_at_one_data_position(tiny_shards):
    single = next(iter(build_loader(data_config(tiny_shards), TINY_SIZE, 8, True, 0, 0, 1)))
    loader = build_loader(data_config(tiny_shards, repeats=2, hflip=True), TINY_SIZE, 8, True, 0, 0, 1)
    batches = list(itertools.islice(iter(loader), 5))  # 5 x 4 videos = one epoch of the 20
    batch = batches[0]
    assert batch["frames"].shape == (8, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) and batch["labels"].shape == (
        8,
    )
    assert batch["keys"] == single["keys"] and batch["state"] == single["state"]  # one position per video
    assert torch.equal(batch["labels"][0::2], batch["labels"][1::2])  # no label map: both clips keep it
    assert torch.equal(batch["labels"][0::2], single["labels"])
    for i in range(4):  # the two clips of a video are augmented independently
        assert not torch.equal(batch["frames"][2 * i], batch["frames"][2 * i + 1])
    keys = [key for b in batches for key in b["keys"]]
    assert len(keys) == len(set(keys)) == 20  # each video once per epoch, however many clips it gives


def test_the_first_repeat_is_the_clip_of_a_run_without_repeats(tiny_shards):
    single = next(iter(build_loader(data_config(tiny_shards), TINY_SIZE, 8, True, 0, 0, 1)))
    repeated = next(iter(build_loader(data_config(tiny_shards, repeats=3), TINY_SIZE, 8, True, 0, 0, 1)))
    assert repeated["frames"].shape[0] == 12
    assert torch.equal(repeated["frames"][0::3], single["frames"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_repeats_continues_the_exact_stream(tiny_shards, workers):
    cfg = data_config(tiny_shards, repeats=2, hflip=True, randaugment=[2, 15], num_workers=workers)
    uninterrupted = list(itertools.islice(iter(build_loader(cfg, TINY_SIZE, 8, True, 0, 0, 1)), 6))
    state = {batch["slot"]: batch["state"] for batch in uninterrupted[:3]}
    resumed = build_loader(cfg, TINY_SIZE, 8, True, 0, 0, 1, resume=state, worker_offset=3 % max(1, workers))
    for a, b in zip(itertools.islice(iter(resumed), 3), uninterrupted[3:], strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["frames"], b["frames"])
        assert torch.equal(a["labels"], b["labels"])


def test_repeats_and_label_swaps_need_class_labels():
    for extra in (dict(repeats=2), dict(hflip=True, flip_label_map=[[0, 1]])):
        with pytest.raises(ValueError, match="recognition"):
            VideoClipDecoder(DataConfig(**extra), TINY_SIZE, Unlabelled(), train=True, seed=0)


# -- RandAugment ---------------------------------------------------------------------------------------------


def test_randaugment_draws_once_per_clip_and_applies_it_alike_to_every_frame():
    """A still clip stays still (one draw for all frames), and each frame of a moving clip gets exactly what
    it would get in a still clip of itself under the same draw."""
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, 256, (1, 3, 24, 32), generator=gen, dtype=torch.uint8) for _ in "ab")
    augment = ClipRandAugment(4, 21)
    changed = 0
    for seed in range(30):
        moving = augment(torch.cat([first, second, first]), np.random.default_rng(seed))
        still = augment(first.expand(3, -1, -1, -1), np.random.default_rng(seed))
        still_second = augment(second.expand(3, -1, -1, -1), np.random.default_rng(seed))
        assert moving.shape == (3, 3, 24, 32) and moving.dtype == torch.uint8
        assert torch.equal(still, still[:1].expand_as(still))
        assert torch.equal(moving[0], still[0]) and torch.equal(moving[2], still[0])
        assert torch.equal(moving[1], still_second[0])
        changed += not torch.equal(moving[0], first[0])
    assert changed >= 20  # n4 at p=0.5: only 1/16 of draws apply nothing (and identity is one op of 14)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 32, 3)) * 180 + 30).astype(np.uint8)
    pixels[:, :10] //= 2  # some structure, and no channel spans 0-255
    return pixels


def apply_op(name: str, pixels: np.ndarray, level: float) -> np.ndarray:
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    return RANDAUGMENT_OPS[name][0](x, level).round().clamp(0, 255)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    ("name", "level", "reference", "tolerance"),
    [
        ("equalize", 0.7, lambda im: ImageOps.equalize(im), 0),
        ("solarize", 0.5, lambda im: ImageOps.solarize(im, 128), 0),
        ("posterize", 0.5, lambda im: ImageOps.posterize(im, 6), 0),
        ("autocontrast", 0.7, lambda im: ImageOps.autocontrast(im), 1),  # PIL truncates, we round
        ("color", 0.5, lambda im: ImageEnhance.Color(im).enhance(1.45), 1),
        ("contrast", -0.5, lambda im: ImageEnhance.Contrast(im).enhance(0.55), 1),
        ("brightness", 0.5, lambda im: ImageEnhance.Brightness(im).enhance(1.45), 1),
        ("sharpness", 0.7, lambda im: ImageEnhance.Sharpness(im).enhance(1.63), 1),
    ],
)
def test_randaugment_ops_match_pil(image, name, level, reference, tolerance):
    ours = apply_op(name, image, level).astype(int)
    expected = np.asarray(reference(Image.fromarray(image))).astype(int)
    difference = np.abs(ours - expected)
    assert difference.max() <= tolerance and difference.mean() < 0.6, (difference.max(), difference.mean())


def test_randaugment_geometry():
    """Rotation as PIL's (counter-clockwise for a positive level), translation by 0.45 x level of the side,
    shear about the centre."""
    pixels = np.zeros((24, 32, 3), dtype=np.uint8)
    pixels[6:18, 4:12], pixels[2:5, 20:30] = 200, 100
    rotated = apply_op("rotate", pixels, 1.0).astype(int)
    expected = np.asarray(Image.fromarray(pixels).rotate(30, resample=Image.BILINEAR)).astype(int)
    assert np.abs(rotated - expected).mean() < 0.2
    # Bilinear: a pixel over half covered by the bright block is above 100.
    moved = apply_op("translate_x", pixels, 0.5)  # 7.2 pixels to the right: columns 4-11 -> 11.2-18.2
    assert np.nonzero(moved[10, :, 0] > 100)[0].tolist() == list(range(11, 19))
    moved = apply_op("translate_y", pixels, -0.5)  # 5.4 pixels up: rows 6-17 -> 0.6-11.6
    assert np.nonzero(moved[:, 6, 0] > 100)[0].tolist() == list(range(1, 13))
    sheared = apply_op("shear_x", pixels, 1.0)  # x_in = x + 0.3 (y - 12): rows above the centre move right
    top, bottom = (np.nonzero(sheared[row, :, 0] > 100)[0].mean() for row in (6, 17))
    assert top > 7.5 + 1 and bottom < 7.5 - 1


@pytest.mark.parametrize("name", sorted(RANDAUGMENT_OPS))
def test_randaugment_op_magnitudes(image, name):
    """Magnitude 0 leaves the image as it is (statistics-driven ops always act); the maximum changes it."""
    untouched = np.array_equal(apply_op(name, image, 0.0), image)
    changed = not np.array_equal(apply_op(name, image, 1.0), image)
    assert untouched == (name not in ("autocontrast", "equalize"))
    assert changed == (name != "identity")


def test_randaugment_runs_in_the_workers_and_is_fixed_by_seed_epoch_and_key(tiny_shards):
    plain = next(iter(build_loader(data_config(tiny_shards), TINY_SIZE, 8, True, 0, 0, 1)))
    cfg = data_config(tiny_shards, randaugment=[4, 21])
    augmented = [next(iter(build_loader(cfg, TINY_SIZE, 8, True, 0, 0, 1))) for _ in range(2)]
    assert augmented[0]["keys"] == plain["keys"]
    assert torch.equal(augmented[0]["frames"], augmented[1]["frames"])
    assert not torch.equal(augmented[0]["frames"], plain["frames"])


def test_randaugment_settings_are_checked():
    DataConfig(randaugment=[4, 21])  # the CPU path takes it now
    with pytest.raises(ValueError, match="magnitude within 1-29"):
        DataConfig(augment_on="device", decode_size=[40, 48], randaugment=[4, 30])


# -- the train crop ------------------------------------------------------------------------------------------


def test_the_released_crop_draws_area_0_08_to_1_and_aspect_3_4_to_4_3_of_a_256_by_320_frame():
    rng = np.random.default_rng(0)
    boxes = np.array(
        [random_resized_crop_box(256, 320, rng, (0.08, 1.0), (0.75, 1.3333)) for _ in range(3000)]
    )
    top, left, height, width = boxes.T
    area, aspect = height * width / (256 * 320), width / height
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 256).all() and (left + width <= 320).all()
    )
    assert area.min() >= 0.078 and area.min() < 0.1 and area.max() > 0.95
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02  # (sides are rounded to pixels)
    assert aspect.min() < 0.8 and aspect.max() > 1.25  # the whole range is drawn


def test_ssv2_configs_crop_the_256_by_320_frame_to_the_model_size(tiny_shards, monkeypatch):
    """The SSv2 configs' data section on the tiny shards: frames decoded at 256 x 320, the crop box drawn over
    them with the released area and aspect ranges, clips at the model size, two per video."""
    import data.shards

    drawn = []

    def recording(height, width, rng, scale, ratio):
        drawn.append((height, width, scale, ratio))
        return random_resized_crop_box(height, width, rng, scale, ratio)

    monkeypatch.setattr(data.shards, "random_resized_crop_box", recording)
    released = load_config("configs/ssv2_vitb16.yaml").data
    cfg = data_config(
        tiny_shards, **{k: getattr(released, k) for k in ("decode_size", "train_scale", "train_ratio")}
    )
    batch = next(iter(build_loader(cfg, TINY_SIZE, 8, True, 0, 0, 1)))
    assert batch["frames"].shape == (4, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
    assert set(drawn) == {(256, 320, (0.08, 1.0), (0.75, 1.3333))} and len(drawn) == 4


# -- the released configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SSV2_CONFIGS + K400_CONFIGS)
def test_released_configs_follow_the_recipe(name):
    cfg = load_config(f"configs/{name}.yaml")
    data, optim = cfg.data, cfg.optim
    assert optim.decay == "all" and optim.weight_decay == 0.15 and cfg.train.label_smoothing == 0.1
    assert data.hflip and data.train_scale == [0.08, 1.0] and data.train_ratio == [0.75, 1.3333]
    if name.startswith("ssv2"):
        assert data.flip_label_map == SSV2_FLIPS and data.repeats == 2 and data.randaugment == [4, 21]
        assert data.decode_size == [256, 320] and (data.eval_clips, data.eval_crops) == (2, 3)
        assert data.batch_size == (8 if "vite14" in name else 16)
    else:
        assert not data.flip_label_map and data.repeats == 1 and data.randaugment[0] == 0
        assert data.batch_size == 32 and (data.eval_clips, data.eval_crops) == (4, 3)


@pytest.mark.parametrize(
    ("name", "warmup_epochs", "epochs", "steps_per_epoch"),
    [
        ("ssv2_vitb16", 4, 30, 1320),  # 168,913 videos / (16 x 8 GPUs)
        ("ssv2_vitl14", 4, 30, 1320),
        ("ssv2_vite14", 6, 25, 2640),  # 168,913 / (8 x 8)
        ("ssv2_vite14_f16", 6, 25, 2640),
        ("k400_vitb16", 4, 30, 940),  # about 240k / (32 x 8)
        ("k400_vitl14", 4, 30, 940),
    ],
)
def test_released_schedules_warm_up_then_reach_zero(name, warmup_epochs, epochs, steps_per_epoch):
    cfg = load_config(f"configs/{name}.yaml")
    steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
    assert (warmup, steps) == (warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    factor = warmup_cosine(cfg.optim, steps)
    assert factor(0) == pytest.approx(1 / warmup) and factor(warmup - 1) == 1.0
    later = [factor(step) for step in range(warmup, steps + 1, 97)]
    assert all(a >= b for a, b in itertools.pairwise(later)) and factor(steps) == 0.0


def test_the_scheduler_takes_the_lr_to_zero_in_optimizer_steps():
    cfg = load_config(None, ["optim.lr=0.1", "optim.warmup_steps=3", "optim.min_lr_ratio=0"]).optim
    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    scheduler = build_scheduler(cfg, optimizer, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1]) and 0 < lrs[-1] < 0.01
    assert optimizer.param_groups[0]["lr"] == 0.0  # after the last step


@pytest.mark.parametrize("name", ["demo", *SSV2_CONFIGS, *K400_CONFIGS])
def test_side4video_configs_load(name):
    load_config(f"configs/{name}.yaml")


def test_training_with_the_ssv2_recipe_runs_end_to_end(tiny_shards, tmp_path):
    """Repeats, flips with swapped labels, RandAugment in the workers, the 256 x 320 crop, decay on every
    parameter and the cosine to 0, through the trainer (8 classes: the pair [0, 1] stands for SSv2's)."""
    recipe = {
        "data.repeats": 2, "data.hflip": True, "data.flip_label_map": "[[0,1]]", "data.randaugment": "[4,21]",
        "data.decode_size": "[64,80]", "data.train_scale": "[0.08,1.0]", "optim.decay": "all",
        "optim.min_lr_ratio": 0.0, "train.steps": 2, "optim.warmup_steps": 1,
    }  # fmt: skip
    result = launch(tiny_overrides(tiny_shards, tmp_path / "run", **recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_videos"] == 12


# -- retrieval as released -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="tiny"), projection=True)


def test_retrieval_projection_has_no_bias_and_starts_at_zero(tiny_backbone):
    model = build_retrieval_network(SideConfig(width=32), tiny_backbone)
    assert model.to_class.bias is None and not model.to_class.weight.any()


def test_retrieval_position_embedding_covers_the_class_token(tiny_backbone):
    """1 + N rows: the class row changes the side tokens; at zero it gives the recognition side network's
    tokens exactly (the position embedding over N patch tokens only)."""
    torch.manual_seed(0)
    model = build_retrieval_network(SideConfig(width=32), tiny_backbone).eval()
    grid = tiny_backbone.grid
    assert model.class_pos_embed.shape == (1, 32) and model.side.pos_embed.shape == (grid * grid, 32)
    assert model.class_pos_embed.abs().max() > 0  # initialised like the patch rows, not left at zero
    frames = torch.randn(2, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        taps = list(tiny_backbone(frames.flatten(0, 1)))
        with_class_row = model.side.forward_features(frames, iter(taps))
        patches_only = Side4Video(
            SideConfig(width=32),
            tiny_backbone.width,
            tiny_backbone.patch_size,
            grid,
            len(taps),
            classifier=False,
        )
        patches_only.load_state_dict(model.side.state_dict())
        reference = patches_only.eval().forward_features(frames, iter(taps))
        assert not torch.allclose(with_class_row, reference)
        model.class_pos_embed.zero_()
        torch.testing.assert_close(model.side.forward_features(frames, iter(taps)), reference)


def test_retrieval_class_position_row_trains(tiny_backbone):
    model = build_retrieval_network(SideConfig(width=32, pos_embed="per_block"), tiny_backbone)
    assert model.class_pos_embed.shape == (len(model.side.blocks), 32)
    with torch.no_grad():
        model.to_class.weight.normal_(0, 0.02)  # so that gradients reach the side network
    frames = torch.randn(2, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
    model(frames, tiny_backbone(frames.flatten(0, 1))).square().sum().backward()
    assert (model.class_pos_embed.grad.abs().sum(1) > 0).all()  # every block's row is used


@pytest.mark.parametrize("pad_tokens", ["zero", "exclude"])
def test_padded_text_tokens_count_as_zero_similarity(tiny_backbone, pad_tokens):
    """With every valid token dissimilar to the frames, the released matching floors each frame's best token
    at a padded token's 0; ``exclude`` keeps the (negative) best valid token."""
    torch.manual_seed(0)
    model = build_retrieval_network(SideConfig(width=32), tiny_backbone)
    model.pad_tokens = pad_tokens
    base = torch.randn(16)
    video = (base + 0.3 * torch.randn(3, 16))[None]  # 3 frames
    text = torch.cat([-base + 0.3 * torch.randn(2, 16), torch.randn(1, 16)])[None]  # 2 words, then a pad
    mask = torch.tensor([[1, 1, 0]])
    sim = torch.nn.functional.cosine_similarity(text[0, :, None], video[0, None], dim=-1)  # (L, T)
    assert (sim[:2] < 0).all()
    with torch.no_grad():
        text_w = model.text_weights(text[0, :2]).softmax(0)
        video_w = model.video_weights(video[0]).softmax(0)
    text_to_video = (sim[:2].amax(1) * text_w).sum()
    best = sim[:2].amax(0).clamp(min=0) if pad_tokens == "zero" else sim[:2].amax(0)
    expected = (text_to_video + (best * video_w).sum()) / 2
    torch.testing.assert_close(model.similarity(video, text, mask)[0, 0], expected.detach())


def test_retrieval_pad_tokens_setting_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="pad_tokens"):
        Side4VideoRetrieval(SideConfig(width=32), 32, 8, 4, 2, 16, 1e-5, True, pad_tokens="mask")
