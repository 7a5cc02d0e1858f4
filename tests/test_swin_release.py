"""Checkpoints from the wild through ``swin.init_from``: files laid out as RELEASES.md section 3 describes
(official Video Swin / mmaction, Swin 2D ImageNet with window 7 and 12, BEVT's released two-stream
pretraining file) and this project's runs of either norm layout, built from random weights at a tiny shape
and loaded the way the trainer does (``read_module_state`` then ``load_encoder_weights``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.bevt import BEVT
from models.swin3d import (
    SWIN_SIZES,
    SwinConfig,
    SwinRecognizer,
    VideoSwin,
    build_swin,
    load_encoder_weights,
    relative_index,
    shift_mask,
    window_for,
)
from trainer.checkpoint import read_module_state

TABLE = "attn.relative_position_bias_table"
SHAPE = SWIN_SIZES["test"]  # embed 16, depths 1-1-2-1, window (2, 4, 4): 64 px -> grids 16, 8, 4, 2
EXTRAS = ("mask_token", "patch_embed.proj2d.", "patch_embed.norm2d.")  # what Video Swin has not


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialisation (norms and biases included), so a load is visible."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def recognizer(name: str, path, classes: int, size: int, inflate: bool = False) -> tuple[SwinRecognizer, str]:
    """A recognition model initialised from ``swin.init_from`` as the trainer's ``load_init`` does."""
    cfg = SwinConfig(name=name, image_size=size, init_from=str(path), num_classes=classes, inflate=inflate)
    model = SwinRecognizer(build_swin(cfg), cfg.num_classes, cfg.head_dropout).eval()
    note = load_encoder_weights(model, read_module_state(cfg.init_from, "swin.init_from"), cfg.inflate)
    return model, note


def block_buffers(model: VideoSwin, size: int, window: tuple[int, int, int], two_d: bool) -> dict:
    """The buffers official Swin stores per block: ``relative_position_index`` (and, in 2D Swin, the shifted
    blocks' ``attn_mask``), for a table of ``window``."""
    buffers = {}
    grid = size // model.shape.patch[1]
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            table = (1, *window[1:]) if two_d else window
            buffers[f"{prefix}attn.relative_position_index"] = relative_index(table, table)
            size3 = (1, grid, grid)
            used, shift = window_for(size3, table, (0, *block.shift[1:]))
            if two_d and any(shift):  # (nW, N, N); a window that does not tile here: any such buffer
                tiles = grid % used[1] == 0
                mask = (
                    shift_mask(size3, used, shift) if tiles else torch.zeros(1, table[1] ** 2, table[1] ** 2)
                )
                buffers[f"{prefix}attn_mask"] = mask
        grid //= 2
    return buffers


def clip_of(frame: torch.Tensor, frames: int) -> torch.Tensor:
    return frame.unsqueeze(2).expand(-1, -1, frames, -1, -1)  # (B, 3, T, H, W): one frame repeated


# -- official Video Swin (mmaction) ------------------------------------------------------------------------


def mmaction_file(path, classes: int, seed: int = 0, **extra) -> VideoSwin:
    video = randomised(VideoSwin(SHAPE), seed)
    state = {f"backbone.{k}": v for k, v in video.state_dict().items() if not k.startswith(EXTRAS)}
    state.update({f"backbone.{k}": v for k, v in block_buffers(video, 64, SHAPE.window, False).items()})
    state["cls_head.fc_cls.weight"] = torch.randn(classes, video.dims[-1])
    state["cls_head.fc_cls.bias"] = torch.randn(classes)
    state.update(extra)
    torch.save({"meta": {"epoch": 30, "mmcv_version": "1.3.1"}, "state_dict": state}, path)
    return video


def test_video_swin_mmaction_checkpoint_loads_with_its_classifier(tmp_path):
    video = mmaction_file(tmp_path / "swin.pth", classes=5)
    model, note = recognizer("test", tmp_path / "swin.pth", classes=5, size=64)
    assert note.startswith("Video Swin (mmaction) checkpoint:")
    assert "head loaded (5 outputs)" in note and "5 recomputed buffers dropped" in note
    fresh = "initialised afresh: [encoder.mask_token, encoder.patch_embed.norm2d, encoder.patch_embed.proj2d]"
    assert fresh in note and "not used: nothing" in note
    clip = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        for got, want in zip(model.encoder(clip), video(clip), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    state = torch.load(tmp_path / "swin.pth", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.head.weight, state["cls_head.fc_cls.weight"])
    # another class count: the classifier stays fresh, and the note says why
    model, note = recognizer("test", tmp_path / "swin.pth", classes=7, size=64)
    assert "[head] (another size than this model's)" in note and "head loaded" not in note
    assert "initialised afresh: [encoder.mask_token" in note and "head]" in note


def test_missing_and_unexpected_tensors_are_one_error_naming_them(tmp_path):
    mmaction_file(tmp_path / "bad.pth", 5, **{"backbone.absolute_pos_embed": torch.zeros(1, 16)})
    state = torch.load(tmp_path / "bad.pth", weights_only=True)
    del state["state_dict"]["backbone.layers.2.blocks.1.mlp.fc2.weight"]
    state["state_dict"]["cls_head.fc_extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        recognizer("test", tmp_path / "bad.pth", 5, 64)
    message = str(error.value)
    assert "\n" not in message and "do not fit" in message
    assert "missing [encoder.layers.2.blocks.1.mlp.fc2.weight]" in message
    assert "unexpected [cls_head.fc_extra.weight, encoder.absolute_pos_embed]" in message


# -- Swin 2D (ImageNet) -------------------------------------------------------------------------------------


def swin2d_file(path, image_model: VideoSwin, window: int = 7, seed: int = 1) -> dict:
    """``{'model': ...}`` as official Swin 2D: the image stream's weights under Swin's names, 4-D patch
    kernel, (2 * window - 1)^2-row bias tables, index and attention-mask buffers and an ImageNet head."""
    wt, wh, ww = image_model.shape.window
    plane = (2 * wh - 1) * (2 * ww - 1)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in image_model.state_dict().items():
        if key == "mask_token" or key.startswith(("patch_embed.proj.", "patch_embed.norm.")):
            continue  # the 3D patch embedding and the mask token: not in an image model
        key = key.replace("patch_embed.proj2d.", "patch_embed.proj.").replace("norm2d.", "norm.")
        if key.endswith(TABLE):
            value = value.view(2 * wt - 1, plane, -1)[wt - 1]  # the image stream's: temporal distance 0
            if window != wh:
                value = torch.randn((2 * window - 1) ** 2, value.shape[1], generator=generator)
        state[key] = value
    state.update(block_buffers(image_model, 224, (1, window, window), True))
    state["head.weight"], state["head.bias"] = torch.randn(10, image_model.dims[-1]), torch.zeros(10)
    torch.save({"model": state}, path)
    return state


def test_swin2d_window7_inflated_gives_the_image_models_features_on_a_repeated_frame(tmp_path):
    image_model = randomised(VideoSwin(SWIN_SIZES["test7"]), 0)  # windows (2, 7, 7); images: (1, 7, 7)
    state = swin2d_file(tmp_path / "swin2d.pth", image_model)
    assert state["patch_embed.proj.weight"].ndim == 4 and state[f"layers.0.blocks.0.{TABLE}"].shape[0] == 169
    assert "layers.0.blocks.1.attn_mask" in state
    model, note = recognizer("test7", tmp_path / "swin2d.pth", classes=4, size=224)
    assert note.startswith("Swin 2D checkpoint:") and "image weights inflated" in note
    assert (
        "initialised afresh: [encoder.mask_token, head]" in note and "[head] (its image classifier)" in note
    )
    frame = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        image_out, video_out = (
            image_model(frame),
            model.encoder(clip_of(frame, 8)),
        )  # 4 slots: shifted in time
    for image_stage, video_stage in zip(image_out, video_out, strict=True):
        assert video_stage.shape[1] == 4
        torch.testing.assert_close(video_stage, image_stage.expand_as(video_stage), rtol=1e-4, atol=1e-4)


def test_swin2d_window12_tables_are_resized_bicubically_then_inflated(tmp_path):
    image_model = randomised(VideoSwin(SWIN_SIZES["test7"]), 0)
    state = swin2d_file(tmp_path / "swin2d_w12.pth", image_model, window=12)
    key = f"layers.1.blocks.0.{TABLE}"
    assert state[key].shape[0] == 529
    state[key] = torch.full_like(state[key], 0.25)  # bicubic resizing keeps a constant table constant
    torch.save({"model": state}, tmp_path / "swin2d_w12.pth")
    model, note = recognizer("test7", tmp_path / "swin2d_w12.pth", classes=4, size=224)
    assert "resized bicubically from window 12 to 7x7" in note
    loaded = model.state_dict()
    torch.testing.assert_close(loaded[f"encoder.{key}"], torch.full((3 * 169, 1), 0.25))
    other = f"layers.3.blocks.1.{TABLE}"  # heads 2: each head's 23 x 23 grid resized to 13 x 13
    grid = state[other].T.reshape(1, 2, 23, 23)
    want = F.interpolate(grid, size=(13, 13), mode="bicubic", align_corners=False).reshape(2, 169).T
    torch.testing.assert_close(loaded[f"encoder.{other}"], want.repeat(3, 1))


# -- BEVT's released two-stream pretraining file ------------------------------------------------------------

# this project's names -> the release's (under the mmaction recognizer's backbone. and cls_head.)
RELEASE_NAMES = {
    "encoder.patch_embed.proj2d.": "backbone.patch_embed_2d.proj.",
    "encoder.patch_embed.norm2d.": "backbone.patch_embed_2d.norm.",
    "decoders.image.fuse.": "backbone.lm_down.",
    "decoders.image.upsample.": "backbone.fpn.0.",
    "decoders.video.fuse.": "backbone.lm_down_st.0.",
    "decoders.video.upsample.": "backbone.fpn_s.0.",
    "decoders.video.temporal.": "backbone.fpn_t.0.",
    "decoder_norm.": "backbone.norm.",
    "encoder.": "backbone.",
    "head.": "cls_head.lm_head.",
}


def bevt_model(seed: int, norms: str = "released", decoder_dim: int = 128) -> BEVT:
    """decoder_dim 128 = stage 4's width at the test shape, as released (1024 at Swin-B)."""
    encoder = VideoSwin(SHAPE, norms=norms, final_norm=False)
    return randomised(BEVT(encoder, vocab_size=16, decoder_dim=decoder_dim), seed)


def bevt_release_file(path, source: BEVT) -> None:
    state = {}
    for key, value in source.state_dict().items():
        prefix = next(p for p in RELEASE_NAMES if key.startswith(p))
        if key == "encoder.mask_token":
            value = value.view(1, 1, -1)
        if key == "decoders.video.upsample.weight":
            value = value.unsqueeze(2)  # the release's is a (1, 2, 2) ConvTranspose3d
        state[RELEASE_NAMES[prefix] + key[len(prefix) :]] = value
    state.update(
        {f"backbone.{k}": v for k, v in block_buffers(source.encoder, 64, SHAPE.window, False).items()}
    )
    state["cls_head.vae_encoder.blocks.input.w"] = torch.randn(8, 3, 7, 7)  # its frozen dVAE rides along
    torch.save({"state_dict": state}, path)


def test_bevt_release_file_fine_tunes_with_its_shared_norm_as_the_final_norm(tmp_path):
    source = bevt_model(0)
    bevt_release_file(tmp_path / "bevt.pth", source)
    model, note = recognizer("test", tmp_path / "bevt.pth", classes=5, size=64)
    assert note.startswith("BEVT release checkpoint:")
    assert "the final norm from the norm the decoders share" in note
    assert "initialised afresh: [head]" in note
    assert "[decoders] (this model has none)" in note and "[head] (the pretraining head)" in note
    assert "[cls_head.vae_encoder] (BEVT's frozen dVAE tokenizer)" in note
    loaded = model.state_dict()
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(loaded[f"encoder.{key}"], value, rtol=0, atol=0)
    torch.testing.assert_close(model.encoder.norm.weight, source.decoder_norm.weight, rtol=0, atol=0)

    # into BEVT pretraining (released norms): every tensor in place, decoders and head included
    target = BEVT(VideoSwin(SHAPE, final_norm=False), vocab_size=16, decoder_dim=128)
    note = load_encoder_weights(target, read_module_state(str(tmp_path / "bevt.pth"), "swin.init_from"))
    assert "initialised afresh: nothing" in note and "head loaded (16 outputs)" in note
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


# -- this project's runs ------------------------------------------------------------------------------------


def test_project_bevt_runs_fine_tune_in_either_norm_layout(tmp_path):
    released = bevt_model(0)
    torch.save(released.state_dict(), tmp_path / "released.pt")
    model, note = recognizer("test", tmp_path / "released.pt", classes=5, size=64)
    assert (
        note.startswith("this project's BEVT run:")
        and "the final norm from the norm the decoders share" in note
    )
    torch.testing.assert_close(model.encoder.norm.bias, released.decoder_norm.bias, rtol=0, atol=0)

    narrow = bevt_model(0, decoder_dim=24)  # a decoder narrower than stage 4: the final norm stays fresh
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    model, note = recognizer("test", tmp_path / "narrow.pt", classes=5, size=64)
    assert "the final norm left fresh: the decoders' shared norm is 24 wide, stage 4 128" in note
    assert "encoder.norm" in note.split("initialised afresh: ")[1]

    earlier = bevt_model(1, norms="encoder")  # a run from before the released norms
    assert earlier.encoder.norm3 is not None and earlier.decoders["image"].norm is not None
    torch.save(earlier.state_dict(), tmp_path / "earlier.pt")
    model, note = recognizer("test", tmp_path / "earlier.pt", classes=5, size=64)
    assert "norms of the earlier layout (bevt.norms: encoder): its stage-3 norm not used, its stage-4" in note
    assert "its one patch-embedding norm initialises both streams'" in note
    assert "[encoder.norm3] (norms this layout does not have)" in note
    patch = earlier.encoder.patch_embed.norm.weight
    torch.testing.assert_close(model.encoder.patch_embed.norm2d.weight, patch, rtol=0, atol=0)
    torch.testing.assert_close(model.encoder.norm.weight, earlier.encoder.norm.weight, rtol=0, atol=0)
    clip = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():  # the video features the earlier run's encoder gives (its stage 4 through norm)
        torch.testing.assert_close(model.encoder(clip)[-1], earlier.encoder(clip)[-1], rtol=0, atol=0)
