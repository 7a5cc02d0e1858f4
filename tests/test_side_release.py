"""The side network as released (RELEASES.md section 1): the E/14 side block, the released parameter counts,
and importing Model Zoo files through ``launch.convert_checkpoint --side4video``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from launch.convert_checkpoint import main as convert_main
from launch.convert_checkpoint import map_release
from models import (
    BackboneConfig,
    SideConfig,
    build_backbone,
    build_side_network,
    count_params,
    load_side_weights,
)
from models.eva_vit import EVA_RENAMES
from models.side4video import TapFusion
from tests.test_models import kept_for_backward
from trainer.config import ConfigError, load_config

FRAMES, CLASSES = 4, 5
CLIP_W, CLIP_LAYERS, CLIP_MLP, PATCH, GRID, EMBED = 32, 2, 64, 8, 4, 16  # the "tiny" shape
EVA_W, EVA_LAYERS, EVA_MLP = 32, 4, 64  # "eva-tiny" at depth 4: taps 1 and 3
N = GRID * GRID
D = 32  # side width (2 heads of 16)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def batch_norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": randn(width),
        f"{prefix}.bias": randn(width),
        f"{prefix}.running_mean": randn(width),
        f"{prefix}.running_var": torch.rand(width) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1234),
    }


def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": randn(width), f"{prefix}.bias": randn(width)}


def linear(prefix: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": randn(out, inp), f"{prefix}.bias": randn(out)}


def temporal_conv(prefix: str, d: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.conv.0.weight": randn(d, d, 1, 1, 1),
        f"{prefix}.conv.0.bias": randn(d),
        f"{prefix}.conv.1.weight": randn(d, 1, 3, 1, 1),  # depthwise over time
        f"{prefix}.conv.1.bias": randn(d),
        f"{prefix}.conv.2.weight": randn(d, d, 1, 1, 1),
        f"{prefix}.conv.2.bias": randn(d),
    }


def clip_release(
    W=CLIP_W, layers=CLIP_LAYERS, mlp=CLIP_MLP, patch=PATCH, tokens=N, d=D, classes=CLASSES, embed=EMBED
) -> dict[str, torch.Tensor]:
    """A B/16-named release (OpenAI tower + side network + fc); tiny by default."""
    torch.manual_seed(0)
    t = {
        "visual.conv1.weight": randn(W, 3, patch, patch),
        "visual.class_embedding": randn(W),
        "visual.positional_embedding": randn(1 + tokens, W),
        **norm("visual.ln_pre", W),
    }
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}"
        t |= norm(f"{block}.ln_1", W)
        t[f"{block}.attn.in_proj_weight"], t[f"{block}.attn.in_proj_bias"] = randn(3 * W, W), randn(3 * W)
        t |= linear(f"{block}.attn.out_proj", W, W) | norm(f"{block}.ln_2", W)
        t |= linear(f"{block}.mlp.c_fc", mlp, W) | linear(f"{block}.mlp.c_proj", W, mlp)
    t |= norm("visual.ln_post", W)
    t["visual.proj"] = randn(W, embed)
    t["visual.side_conv1.weight"], t["visual.side_conv1.bias"] = randn(d, 3, 3, patch, patch), randn(d)
    t |= batch_norm("visual.side_pre_bn3d", d)
    t["visual.transformer.side_spatial_position_embeddings"] = randn(tokens, d)
    for k in range(layers):
        t |= norm(f"visual.transformer.side_lns.{k}", W)
        t |= linear(f"visual.transformer.side_linears.{k}", d, W)
        side = f"visual.transformer.side_transformer.{k}"
        t |= batch_norm(f"{side}.bn_1", d) | temporal_conv(side, d) | norm(f"{side}.ln_1", d)
        t[f"{side}.attn.in_proj_weight"], t[f"{side}.attn.in_proj_bias"] = randn(3 * d, d), randn(3 * d)
        t |= linear(f"{side}.attn.out_proj", d, d) | batch_norm(f"{side}.bn_2", d)
        t |= linear(f"{side}.mlp.fc1", 4 * d, d) | linear(f"{side}.mlp.fc2", d, 4 * d)
    t |= batch_norm("visual.side_post_bn", d) | linear("fc", classes, d)
    return t


def eva_release(
    W=EVA_W, layers=EVA_LAYERS, mlp=EVA_MLP, patch=PATCH, tokens=N, d=D, classes=CLASSES, embed=EVA_W
) -> dict[str, torch.Tensor]:
    """An E/14-named release (EVA-CLIP tower + post-norm side network on every odd block + fc)."""
    torch.manual_seed(1)
    t = {
        "visual.patch_embed.proj.weight": randn(W, 3, patch, patch),
        "visual.patch_embed.proj.bias": randn(W),
        "visual.cls_token": randn(1, 1, W),
        "visual.pos_embed": randn(1, 1 + tokens, W),
    }
    for i in range(layers):
        block = f"visual.blocks.{i}"
        t |= norm(f"{block}.norm1", W) | norm(f"{block}.norm2", W)
        t[f"{block}.attn.qkv.weight"] = randn(3 * W, W)
        t[f"{block}.attn.q_bias"], t[f"{block}.attn.v_bias"] = randn(W), randn(W)
        t |= linear(f"{block}.attn.proj", W, W)
        t |= linear(f"{block}.mlp.fc1", mlp, W) | linear(f"{block}.mlp.fc2", W, mlp)
    t |= norm("visual.norm", W) | linear("visual.head", embed, W)
    t["visual.side_conv1.weight"], t["visual.side_conv1.bias"] = randn(d, 3, 3, patch, patch), randn(d)
    t |= batch_norm("visual.side_pre_bn3d", d)
    t["visual.side_spatial_position_embeddings"] = randn(tokens, d)
    for k in range(layers // 2):
        t |= linear(f"visual.side_linears.{k}", d, W) | norm(f"visual.side_lns.{k}", d)
        side = f"visual.side_blocks.{k}"
        t |= temporal_conv(side, d) | batch_norm(f"{side}.bn_1", d) | batch_norm(f"{side}.bn_2", d)
        for proj in ("q_proj", "k_proj", "v_proj", "proj"):
            t |= linear(f"{side}.attn.{proj}", d, d)
        t |= norm(f"{side}.ln_1", d)
        t |= linear(f"{side}.mlp.0", 4 * d, d) | linear(f"{side}.mlp.2", d, 4 * d)
    t |= linear("fc", classes, d)
    return t


def model_zoo_file(path, state: dict[str, torch.Tensor], prefix=lambda key: "module." + key):
    """``state`` saved as a Model Zoo file (DDP-wrapped keys, an optimizer state beside)."""
    model_state = {prefix(key): value for key, value in state.items()}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": []}
    torch.save({"epoch": 7, "model_state_dict": model_state, "optimizer_state_dict": optimizer}, path)
    return path


def config_file(tmp_path, family: str, **side) -> str:
    backbone = "  name: tiny" if family == "clip" else f"  name: eva-tiny\n  num_layers: {EVA_LAYERS}"
    options = "".join(f"\n  {key}: {value}" for key, value in side.items())
    text = f"backbone:\n{backbone}\nside:\n  width: {D}\n  heads: 2\n  num_classes: {CLASSES}{options}\n"
    text += f"data:\n  num_frames: {FRAMES}\n"
    path = tmp_path / f"{family}.yaml"
    path.write_text(text)
    return str(path)


def convert(tmp_path, family: str, state: dict, *overrides: str, prefix=None) -> int:
    """Save ``state`` as a Model Zoo file and run the converter on it in process; its exit status."""
    source = model_zoo_file(tmp_path / "release.pt", state, *([prefix] if prefix else []))
    args = ["--side4video", str(source), "--config", config_file(tmp_path, family), "--out"]
    return convert_main([*args, str(tmp_path / "out"), *overrides])


# What each side network tensor is called in the release, written out here apart from the converter's
# tables: project name -> release name (the E/14 block's q, k, v: see expected_side_value).
def clip_side_names(blocks: int, release: dict) -> dict[str, str]:
    names = {"stem.weight": "visual.side_conv1.weight", "stem.bias": "visual.side_conv1.bias"}
    names["pos_embed"] = "visual.transformer.side_spatial_position_embeddings"
    pairs = [("stem_norm", "visual.side_pre_bn3d"), ("norm", "visual.side_post_bn"), ("head", "fc")]
    for k in range(blocks):
        side, block = f"visual.transformer.side_transformer.{k}", f"blocks.{k}"
        pairs += [
            (f"{block}.fusion.norm", f"visual.transformer.side_lns.{k}"),
            (f"{block}.fusion.proj", f"visual.transformer.side_linears.{k}"),
            (f"{block}.temporal.norm", f"{side}.bn_1"),
            (f"{block}.temporal.pw_in", f"{side}.conv.0"),
            (f"{block}.temporal.depthwise", f"{side}.conv.1"),
            (f"{block}.temporal.pw_out", f"{side}.conv.2"),
            (f"{block}.attn_norm", f"{side}.ln_1"),
            (f"{block}.attn.out_proj", f"{side}.attn.out_proj"),
            (f"{block}.mlp.norm", f"{side}.bn_2"),
            (f"{block}.mlp.fc1", f"{side}.mlp.fc1"),
            (f"{block}.mlp.fc2", f"{side}.mlp.fc2"),
        ]
        names[f"{block}.attn.in_proj.weight"] = f"{side}.attn.in_proj_weight"
        names[f"{block}.attn.in_proj.bias"] = f"{side}.attn.in_proj_bias"
    return _expand(names, pairs, release)


def eva_side_names(blocks: int, release: dict) -> dict[str, str]:
    names = {"stem.weight": "visual.side_conv1.weight", "stem.bias": "visual.side_conv1.bias"}
    names["pos_embed"] = "visual.side_spatial_position_embeddings"
    pairs = [("stem_norm", "visual.side_pre_bn3d"), ("head", "fc")]
    for k in range(blocks):
        side, block = f"visual.side_blocks.{k}", f"blocks.{k}"
        pairs += [
            (f"{block}.fusion.proj", f"visual.side_linears.{k}"),
            (f"{block}.fusion.norm", f"visual.side_lns.{k}"),
            (f"{block}.temporal.pw_in", f"{side}.conv.0"),
            (f"{block}.temporal.depthwise", f"{side}.conv.1"),
            (f"{block}.temporal.pw_out", f"{side}.conv.2"),
            (f"{block}.temporal.norm", f"{side}.bn_1"),
            (f"{block}.attn.out_proj", f"{side}.attn.proj"),
            (f"{block}.attn_norm", f"{side}.ln_1"),
            (f"{block}.mlp.norm", f"{side}.bn_2"),
            (f"{block}.mlp.fc1", f"{side}.mlp.0"),
            (f"{block}.mlp.fc2", f"{side}.mlp.2"),
        ]
    return _expand(names, pairs, release)


def _expand(names: dict[str, str], pairs: list[tuple[str, str]], release: dict) -> dict[str, str]:
    """Module pairs -> tensor pairs, for the tensors the release's module holds (norm statistics too)."""
    for ours, theirs in pairs:
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if f"{theirs}.{leaf}" in release:
                names[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    return names


def expected_side_value(name: str, release: dict, names: dict[str, str]) -> torch.Tensor:
    """The release's tensor for the project's ``name`` (q, k, v of the E/14 block stacked in that order)."""
    if name in names:
        return release[names[name]]
    block, leaf = name.split(".attn.in_proj.")  # E/14: q_proj, k_proj, v_proj -> one in_proj
    k = block.split(".")[1]
    return torch.cat([release[f"visual.side_blocks.{k}.attn.{p}_proj.{leaf}"] for p in "qkv"])


def openai_to_transformers(release: dict) -> dict[str, torch.Tensor]:
    """The OpenAI CLIP tower under transformers' CLIPVisionModelWithProjection names (standard mapping)."""
    ours = {
        "vision_model.embeddings.class_embedding": release["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": release["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": release["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": release["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": release["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": release["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": release["visual.ln_post.bias"],
        "visual_projection.weight": release["visual.proj"].T,
    }
    for i in range(CLIP_LAYERS):
        src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            for name, part in zip("qkv", release[f"{src}attn.in_proj_{leaf}"].split(CLIP_W), strict=True):
                ours[f"{dst}self_attn.{name}_proj.{leaf}"] = part
            ours[f"{dst}self_attn.out_proj.{leaf}"] = release[f"{src}attn.out_proj.{leaf}"]
            ours[f"{dst}layer_norm1.{leaf}"] = release[f"{src}ln_1.{leaf}"]
            ours[f"{dst}layer_norm2.{leaf}"] = release[f"{src}ln_2.{leaf}"]
            ours[f"{dst}mlp.fc1.{leaf}"] = release[f"{src}mlp.c_fc.{leaf}"]
            ours[f"{dst}mlp.fc2.{leaf}"] = release[f"{src}mlp.c_proj.{leaf}"]
    return ours


# -- import of released checkpoints --------------------------------------------------------------------------


def test_clip_release_imports_whole(tmp_path, capsys):
    release = clip_release()
    assert convert(tmp_path, "clip", release) == 0, capsys.readouterr().err
    account = capsys.readouterr().out
    out = tmp_path / "out"
    cfg = load_config(config_file(tmp_path, "clip"), [f"side.init_from={out}"])
    side = build_side_network(cfg.side, build_backbone(cfg.backbone))
    assert side.block == "clip"
    note = load_side_weights(side, cfg.side.init_from)
    names = clip_side_names(CLIP_LAYERS, release)
    state = side.state_dict()
    assert set(state) == set(names)
    for name, value in state.items():  # every side tensor holds the release's values, reshaped
        torch.testing.assert_close(value, release[names[name]].reshape(value.shape), rtol=0, atol=0)
    # Every release tensor went somewhere: the side network, or the frozen tower (below).
    tower = {k for k in release if not k.startswith(("visual.side_", "visual.transformer.side_", "fc."))}
    assert len(names) + len(tower) == len(release)
    params = count_params(side)
    assert f"mapped {len(release)} tensors (release epoch 7)" in account
    assert f"side network + classifier {params:,} parameters" in account and f"{params:,}" in note
    assert "visual.ln_post.weight" in account and "visual.proj" in account
    assert "optimizer state not converted" in account

    # The frozen tower: the project's CLIP (loaded from backbone.safetensors by backbone.pretrained) equals
    # transformers' CLIPVisionModel with QuickGELU built from the OpenAI weights mapped by hand.
    config = CLIPVisionConfig(
        hidden_size=CLIP_W,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=2,
        intermediate_size=CLIP_MLP,
        patch_size=PATCH,
        image_size=GRID * PATCH,
        projection_dim=EMBED,
        hidden_act="quick_gelu",
    )
    reference = CLIPVisionModelWithProjection(config).eval()
    reference.load_state_dict(openai_to_transformers(release), strict=True)
    pretrained = str(out / "backbone.safetensors")
    backbone = build_backbone(BackboneConfig(name="tiny", pretrained=pretrained), projection=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True)
        taps = list(backbone(images))
        norm, proj = backbone.output_head()
        embeds = proj(norm(taps[-1][:, 0]))
    for tap, hidden in zip(taps, expected.hidden_states[1:], strict=True):
        torch.testing.assert_close(tap, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds, expected.image_embeds, rtol=1e-5, atol=1e-5)


def test_eva_release_imports_whole(tmp_path, capsys):
    release = eva_release()
    # the older layout: the tower nested under model.visual., the whole model DDP-wrapped
    nested = lambda key: "module." + ("model." + key if key.startswith("visual.") else key)
    assert convert(tmp_path, "eva", release, prefix=nested) == 0, capsys.readouterr().err
    account = capsys.readouterr().out
    out = tmp_path / "out"
    cfg = load_config(config_file(tmp_path, "eva"), [f"side.init_from={out / 'side.safetensors'}"])
    backbone = build_backbone(
        BackboneConfig(name="eva-tiny", num_layers=EVA_LAYERS, pretrained=str(out / "backbone.safetensors"))
    )
    side = build_side_network(cfg.side, backbone)
    assert side.block == "eva" and len(side.blocks) == 2
    load_side_weights(side, cfg.side.init_from)
    names = eva_side_names(2, release)
    state = side.state_dict()
    assert len(state) == len(names) + 2 * 2  # + in_proj weight and bias per block, from q, k, v
    for name, value in state.items():
        expected = expected_side_value(name, release, names)
        torch.testing.assert_close(value, expected.reshape(value.shape), rtol=0, atol=0)
    tower = {k for k in release if not k.startswith(("visual.side_", "fc."))}
    assert len(names) + 2 * 3 * 2 + len(tower) == len(release)  # q, k, v weight and bias of 2 blocks
    for name, param in backbone.named_parameters():  # the names models/eva_vit.py loads
        torch.testing.assert_close(param, release[f"visual.{EVA_RENAMES.get(name, name)}"], rtol=0, atol=0)
    assert f"mapped {len(release)} tensors" in account and "visual.head.weight" in account
    assert f"side network + classifier {count_params(side):,} parameters" in account


def test_unused_or_missing_release_tensors_are_errors(tmp_path, capsys):
    release = clip_release()
    release["visual.side_extra.weight"] = torch.zeros(3)
    release["visual.transformer.side_transformer.0.gamma"] = torch.zeros(3)
    assert convert(tmp_path, "clip", release) == 1
    error = capsys.readouterr().err
    assert (
        "2 tensors" in error and "visual.side_extra.weight" in error and "side_transformer.0.gamma" in error
    )
    assert not (tmp_path / "out").exists()  # nothing written

    release = clip_release()
    del release["visual.transformer.side_transformer.1.bn_2.running_var"]
    assert convert(tmp_path, "clip", release) == 1
    assert "1 missing ['blocks.1.mlp.norm.running_var']" in capsys.readouterr().err
    release = clip_release()
    del release["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    assert convert(tmp_path, "clip", release) == 1
    assert "missing ['vision_model.encoder.layers.1.mlp.fc1.bias']" in capsys.readouterr().err

    # The config decides the shapes: 6 classes do not fit a 5-class release; per-block position embeddings
    # do not fit the released shared one; the E/14 names do not fit the CLIP block.
    assert convert(tmp_path, "clip", clip_release(), "side.num_classes=6") == 1
    assert f"head.weight ({CLASSES}, {D}) != (6, {D})" in capsys.readouterr().err
    assert convert(tmp_path, "clip", clip_release(), "side.pos_embed=per_block") == 1
    assert "unexpected ['pos_embed']" in capsys.readouterr().err
    assert convert(tmp_path, "eva", eva_release(), "side.block=clip") == 1
    assert "fit no name of the eva tower or the clip side network" in capsys.readouterr().err


def test_load_side_weights_is_strict(tmp_path):
    backbone = build_backbone(BackboneConfig(name="tiny"))
    side = build_side_network(SideConfig(width=D, num_classes=CLASSES), backbone)
    state = {k: v.clone() for k, v in side.state_dict().items()}
    with pytest.raises(ValueError, match=r"no side\.safetensors"):
        load_side_weights(side, tmp_path)
    save_file(state, tmp_path / "side.safetensors")
    fresh = build_side_network(SideConfig(width=D, num_classes=CLASSES), backbone)
    load_side_weights(fresh, tmp_path)  # the directory holding it
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())

    state["blocks.9.extra"] = torch.zeros(1)
    del state["blocks.0.mlp.norm.running_mean"]
    state["head.weight"] = torch.zeros(CLASSES + 1, D)
    save_file(state, tmp_path / "side.safetensors")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_side_weights(fresh, tmp_path / "side.safetensors")
    message = str(error.value)
    assert "1 missing ['blocks.0.mlp.norm.running_mean']" in message
    assert "1 unexpected ['blocks.9.extra']" in message
    assert f"head.weight ({CLASSES + 1}, {D}) != ({CLASSES}, {D})" in message
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # nothing loaded


def test_trainer_builds_the_side_network_from_init_from(tmp_path, capsys):
    from trainer.distributed import DistInfo
    from trainer.trainer import Trainer

    assert convert(tmp_path, "clip", clip_release()) == 0
    out = tmp_path / "out"
    trainer = Trainer.__new__(Trainer)  # only what build_network reads
    trainer.dist, trainer.retrieval, trainer.notes = DistInfo(0, 0, 1, torch.device("cpu")), False, []
    trainer.cfg = load_config(
        config_file(tmp_path, "clip"),
        [f"side.init_from={out}", f"backbone.pretrained={out / 'backbone.safetensors'}"],
    )
    side = trainer.build_network()
    reference = build_side_network(trainer.cfg.side, trainer.backbone)
    load_side_weights(reference, out)
    for (name, a), b in zip(side.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(trainer.notes) == 1 and "side network initialised from" in trainer.notes[0]

    trainer.cfg = load_config(config_file(tmp_path, "clip"), ["side.num_classes=6", f"side.init_from={out}"])
    with pytest.raises(ConfigError, match=r"^side\.init_from: .*head\.weight"):
        trainer.build_network()


# -- the E/14 side block -------------------------------------------------------------------------------------


def eva_side(**options):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="eva-tiny", num_layers=EVA_LAYERS))
    side = build_side_network(SideConfig(width=D, heads=2, num_classes=CLASSES, **options), backbone)
    with torch.no_grad():  # norms away from their identity initialisation, so that their gradients matter
        for module in side.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                module.weight.normal_()
                module.bias.normal_()
    return backbone, side


def clips(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, FRAMES, 3, 32, 32)  # (B, T, 3, H, W)


def released_eva_block(block, x: torch.Tensor, tap: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The E/14 side block as RELEASES.md writes it, channels-first with Conv3d and BatchNorm3d over
    (B, d, T, h, w), from the block's weights; batch statistics (training)."""
    batch, frames, _, d = x.shape
    heads = block.attn.heads

    def bn3d(norm, y):  # y (B, T, N, d) -> BatchNorm3d over channels -> (B, T, N, d)
        y = y.permute(0, 3, 1, 2).reshape(batch, d, frames, GRID, GRID)
        y = F.batch_norm(y, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        return y.flatten(3).permute(0, 2, 3, 1)

    fused = F.layer_norm(F.linear(tap, block.fusion.proj.weight, block.fusion.proj.bias), (d,))
    fused = fused * block.fusion.norm.weight + block.fusion.norm.bias  # LN after the projection
    fused = fused.unflatten(0, (batch, frames))  # (B, T, 1 + N, d)
    cls, x = fused[:, :, 0], 0.5 * x + 0.5 * fused[:, :, 1:]

    temporal = block.temporal
    y = x.permute(0, 3, 1, 2).reshape(batch, d, frames, GRID, GRID)
    y = F.conv3d(y, temporal.pw_in.weight.view(d, d, 1, 1, 1), temporal.pw_in.bias)
    y = F.conv3d(
        y, temporal.depthwise.weight.view(d, 1, 3, 1, 1), temporal.depthwise.bias, padding=(1, 0, 0), groups=d
    )
    y = F.conv3d(y, temporal.pw_out.weight.view(d, d, 1, 1, 1), temporal.pw_out.bias)
    x = x + bn3d(temporal.norm, y.flatten(3).permute(0, 2, 3, 1))  # 1. no norm before the conv

    half = d // 2
    shifted = torch.zeros_like(cls)
    shifted[:, :-1, :half] = cls[:, 1:, :half]  # from t+1
    shifted[:, 1:, half:] = cls[:, :-1, half:]  # from t-1
    context = torch.cat([shifted[:, :, None], x + pos], dim=2).flatten(0, 1)  # (B*T, 1 + N, d)
    q_w, k_w, v_w = block.attn.in_proj.weight.chunk(3)
    q_b, k_b, v_b = block.attn.in_proj.bias.chunk(3)
    split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # (B*T, heads, L, head_dim)
    q = split(F.linear(context[:, 1:], q_w, q_b))  # queries: the patch tokens only
    k, v = split(F.linear(context, k_w, k_b)), split(F.linear(context, v_w, v_b))
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ v
    attn = F.linear(attn.transpose(1, 2).flatten(2), block.attn.out_proj.weight, block.attn.out_proj.bias)
    x = x + block.attn_norm(attn).view_as(x)  # 2. LN_1 after the attention, none before

    mlp = block.mlp
    hidden = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    return x + bn3d(mlp.norm, hidden)  # 3. BN_2 after the MLP


def test_eva_block_computes_the_released_post_norm_block():
    backbone, side = eva_side(mlp_chunk=0, recompute_norms=False)
    assert side.block == "eva" and isinstance(side.norm, torch.nn.Identity)  # no norm before pooling
    block = side.blocks[0]
    assert block.fusion.norm.normalized_shape == (D,)  # LayerNorm(d) after Linear(W -> d)
    tap = next(iter(backbone(clips().flatten(0, 1))))  # (B*T, 1 + N, W)
    x = torch.randn(2, FRAMES, N, D)
    with torch.no_grad():
        torch.testing.assert_close(
            block(x, tap, side.pos_embed), released_eva_block(block, x, tap, side.pos_embed)
        )
        # With LN_1, BN_1 and BN_2 zeroed the residual parts add nothing: x = 0.5 x + 0.5 fused patches.
        for norm in (block.temporal.norm, block.attn_norm, block.mlp.norm):
            norm.weight.zero_()
            norm.bias.zero_()
        fused = block.fusion.norm(block.fusion.proj(tap)).unflatten(0, (2, FRAMES))[:, :, 1:]
        torch.testing.assert_close(block(x, tap, side.pos_embed), 0.5 * x + 0.5 * fused)
        # The network: mean of the side tokens over time and space -> fc, no norm between.
        frames = clips()
        features = side.forward_features(frames, backbone(frames.flatten(0, 1)))
        logits = side(frames, backbone(frames.flatten(0, 1)))
    torch.testing.assert_close(logits, side.head(features.mean(dim=(1, 2))))


LEAN = {
    "chunked mlp + recomputed norms": dict(mlp_chunk=50),
    "chunked mlp": dict(mlp_chunk=50, recompute_norms=False),
    "recomputed norms": dict(mlp_chunk=0),
    "eager attention": dict(mlp_chunk=50, attention="eager"),
}


@pytest.mark.parametrize("lean", LEAN)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_eva_block_lean_paths_give_plain_autograd_gradients(lean, checkpoint):
    frames = clips()
    runs = {}
    for name, options in (("plain", dict(mlp_chunk=0, recompute_norms=False)), ("lean", LEAN[lean])):
        backbone, side = eva_side(checkpoint=checkpoint and name == "lean", **options)
        with kept_for_backward(side.parameters()) as kept:
            out = side(frames, backbone(frames.flatten(0, 1)))
        out.logsumexp(-1).sum().backward()
        runs[name] = side, out, sum(kept.values())
    (plain, plain_out, plain_saved), (lean_side, lean_out, lean_saved) = runs["plain"], runs["lean"]
    torch.testing.assert_close(lean_out, plain_out)
    for (name, a), b in zip(plain.named_parameters(), lean_side.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(plain.named_buffers(), lean_side.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)  # running statistics updated once per step
    if checkpoint or lean != "eager attention":
        assert lean_saved < plain_saved


@pytest.mark.parametrize("recompute", [False, True])
def test_post_norm_tap_fusion_keeps_the_handed_over_tap_and_matches_plain_autograd(recompute):
    torch.manual_seed(0)
    fusion = TapFusion(48, 16, post_norm=True, recompute_norm=recompute)
    with torch.no_grad():
        fusion.norm.weight.normal_()
        fusion.norm.bias.normal_()
    tap = torch.randn(6, 5, 48).to(torch.bfloat16)  # (B*T, 1 + N, W), no autograd history

    def loss_and_grads(tokens):
        cls, patches = fusion(tokens, 3)
        loss = cls.sum() * 2 + (patches**2).sum()
        return cls, torch.autograd.grad(loss, list(fusion.parameters()))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cls, grads = loss_and_grads(tap)
    plain_cls, plain_grads = loss_and_grads(tap.float().requires_grad_())
    torch.testing.assert_close(cls, plain_cls)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    wide = [t for t in saved if t.shape[-1] == 48 and t.ndim == 3]
    assert [t.dtype for t in wide] == [torch.bfloat16]  # the tap as handed over, no float32 copy
    projections = [t for t in saved if t.shape == (6, 5, 16)]
    assert len(projections) == (0 if recompute else 1)


# -- the released shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "width", "block", "params"),
    [
        ("vit-b16", 320, "clip", 21_112_686),
        ("vit-l14", 512, "clip", 102_108_846),
        ("vit-e14", 576, "eva", 183_373_806),
    ],
)
def test_trainable_parameters_equal_the_release(name, width, block, params):
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name=name))
        side = build_side_network(SideConfig(width=width, num_classes=174), backbone)
        per_block = build_side_network(
            SideConfig(width=width, num_classes=174, pos_embed="per_block"), backbone
        )
    assert side.block == block and count_params(side) == params
    tokens = backbone.grid**2
    assert count_params(per_block) == params + (len(backbone.taps) - 1) * tokens * width


PUBLISHED = {  # backbone: (side width, the release's layout at 174 classes, its trainable parameters)
    "vit-b16": (320, lambda: clip_release(768, 12, 3072, 16, 196, 320, 174, 512), 21_112_686),
    "vit-l14": (512, lambda: clip_release(1024, 24, 4096, 14, 256, 512, 174, 768), 102_108_846),
    "vit-e14": (576, lambda: eva_release(1792, 64, 15360, 14, 256, 576, 174, 1024), 183_373_806),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_release_layout_fits_the_published_shapes(name):
    """RELEASES.md's layout at the real shapes (on meta) maps onto the project's side network and tower."""
    width, release, params = PUBLISHED[name]
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name=name))
        side_network = build_side_network(SideConfig(width=width, num_classes=174), backbone)
        state = release()
    side, tower, filled = map_release(state, backbone, side_network)
    buffers = {key for key, _ in side_network.named_buffers()}
    assert sum(t.numel() for key, t in side.items() if key not in buffers) == params
    assert not filled and sum(tower[n].numel() for n in tower if n != "visual_projection.weight") == sum(
        p.numel() for p in backbone.parameters()
    )


def test_side_block_choice():
    def block(name: str, **options) -> str:
        with torch.device("meta"):
            backbone = build_backbone(BackboneConfig(name=name))
            return build_side_network(SideConfig(width=64, **options), backbone).block

    assert [block(n) for n in ("vit-e14", "eva-tiny", "eva-small", "tiny", "demo", "vit-b16")] == [
        *("eva",) * 3,
        *("clip",) * 3,
    ]
    assert block("vit-e14", block="clip") == "clip" and block("tiny", block="eva") == "eva"
    with pytest.raises(ValueError, match=r"side\.block"):
        SideConfig(block="post")
    with pytest.raises(ValueError, match=r"side\.pos_embed"):
        SideConfig(pos_embed="none")


def test_position_embedding_is_shared_and_initialised_as_released():
    torch.manual_seed(0)
    for name, std in (("tiny", 0.01), ("eva-tiny", 0.02)):  # the paper's init; the E/14 release's
        backbone = build_backbone(BackboneConfig(name=name, num_layers=4, tap_every=1))
        side = build_side_network(SideConfig(width=64), backbone)
        assert side.pos_embed.shape == (N, 64) and all(block.pos_embed is None for block in side.blocks)
        assert side.pos_embed.std().item() == pytest.approx(std, rel=0.2)
        frames = clips()
        side(frames, backbone(frames.flatten(0, 1))).sum().backward()
        assert side.pos_embed.grad.abs().sum() > 0


def test_converted_files_hold_the_tensors_as_named(tmp_path, capsys):
    assert convert(tmp_path, "eva", eva_release()) == 0
    capsys.readouterr()
    side = load_file(tmp_path / "out" / "side.safetensors")
    assert side["blocks.0.attn.in_proj.weight"].shape == (3 * D, D)
    assert side["blocks.1.temporal.depthwise.weight"].shape == (D, 1, 3)
    assert side["stem_norm.num_batches_tracked"].item() == 1234
