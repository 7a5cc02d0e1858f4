"""EVA-CLIP ViT-E: published shape, post-norm blocks, checkpoint loading and conversion."""

from __future__ import annotations

import pytest
import torch

from launch.convert_checkpoint import main as convert_main
from models import BackboneConfig, SideConfig, build_backbone, build_side_network
from tests.conftest import eva_state_dict


def test_vit_e_has_the_published_size_and_block_shapes():
    with torch.device("meta"):
        model = build_backbone(BackboneConfig(name="vit-e14"))
        side = build_side_network(SideConfig(width=576, num_classes=174), model)
    total = sum(p.numel() for p in model.parameters())
    assert 4.35e9 <= total <= 4.45e9, total
    block = model.blocks[0]
    assert len(model.blocks) == 64 and model.width == 1792 and model.patch_size == 14
    assert block.attn.qkv.weight.shape == (3 * 1792, 1792) and block.attn.heads == 16  # 16 heads of 112
    assert block.mlp.fc1.weight.shape == (15360, 1792)
    assert model.taps == list(range(1, 64, 2)) and len(side.blocks) == 32  # odd indices, published
    assert side.blocks[0].attn.heads == 9


def test_post_norm_block():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="eva-tiny", tap_layers=[0]))
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    expected = x + block.norm1(block.attn(x))
    expected = expected + block.norm2(block.mlp(expected))
    torch.testing.assert_close(block(x), expected)


def eva_checkpoint(model) -> dict[str, torch.Tensor]:
    """The model's weights under EVA-CLIP's key names, with a text tower beside them."""
    weights = eva_state_dict(model)
    weights["text.token_embedding.weight"] = torch.randn(10, 4)
    weights["logit_scale"] = torch.tensor(4.6)
    return weights


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_eva_loads_checkpoints_and_the_converter_output(tmp_path, fmt):
    torch.manual_seed(0)
    source = build_backbone(BackboneConfig(name="eva-tiny"))
    for p in source.parameters():
        p.data.normal_()
    torch.save({"state_dict": eva_checkpoint(source)}, tmp_path / "eva.pt")
    path = tmp_path / "eva.pt"
    if fmt == "safetensors":
        assert convert_main(["--src", str(path), "--out", str(tmp_path / "vision.safetensors")]) == 0
        path = tmp_path / "vision.safetensors"
    loaded = build_backbone(BackboneConfig(name="eva-tiny", pretrained=str(path)))
    images = torch.randn(2, 3, 32, 32)
    for a, b in zip(source(images), loaded(images), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    weights = eva_checkpoint(build_backbone(BackboneConfig(name="eva-tiny")))
    del weights["visual.blocks.1.mlp.fc2.weight"]
    weights["visual.blocks.7.gamma_1"] = torch.ones(32)
    torch.save(weights, tmp_path / "eva.pt")
    with pytest.raises(
        KeyError, match=r"1 missing \['blocks\.1\.mlp\.fc2\.weight'\], 1 unexpected \['blocks\.7"
    ):
        build_backbone(BackboneConfig(name="eva-tiny", pretrained=str(tmp_path / "eva.pt")))


def test_loading_is_piece_by_piece(tmp_path):
    # The gather hook sees each block on its own: a sharded load never needs the whole model at once.
    source = build_backbone(BackboneConfig(name="eva-tiny"))
    torch.save(eva_checkpoint(source), tmp_path / "eva.pt")
    sizes = []

    def gather(params):
        sizes.append(sum(p.numel() for p in params))
        from contextlib import nullcontext

        return nullcontext()

    model = build_backbone(
        BackboneConfig(name="eva-tiny", pretrained=str(tmp_path / "eva.pt")), gather=gather
    )
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert len(sizes) == 5 and max(sizes) == block  # embeddings, 2 blocks, norm, head
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
