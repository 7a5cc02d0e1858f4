"""Frozen backbone + side network: shapes, gradients, freezing, interleaving and saved-activation memory."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from models import (
    BackboneConfig,
    SideConfig,
    build_backbone,
    build_side_network,
    count_params,
    meta_backbone,
    select_taps,
)
from models.side4video import shift_class_token

FRAMES = 4
TINY_CLIP = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    image_size=32,
)


def build(layers: int = 2, tap_every: int = 1, width: int = 32, **backbone):
    torch.manual_seed(0)
    backbone_model = build_backbone(
        BackboneConfig(name="tiny", num_layers=layers, tap_every=tap_every, **backbone)
    )
    side = build_side_network(SideConfig(width=width, num_classes=5), backbone_model)
    return backbone_model, side


def clips(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, size, size)  # (B, T, 3, H, W)


def run(backbone, side, frames):
    return side(frames, backbone(frames.flatten(0, 1)))


def test_select_taps():
    assert select_taps(12) == list(range(12))
    assert select_taps(64, tap_every=2) == list(range(1, 64, 2))  # ViT-E: odd indices, 32 taps
    assert select_taps(12, tap_layers=[11, 3, 3]) == [3, 11]
    with pytest.raises(ValueError, match="out of range"):
        select_taps(4, tap_layers=[4])


@pytest.mark.parametrize("tap_every", [1, 2])
def test_shapes_and_finite(tap_every):
    backbone, side = build(layers=4, tap_every=tap_every)
    assert len(side.blocks) == len(backbone.taps) == 4 // tap_every
    logits = run(backbone, side, clips())
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    features = side.forward_features(clips(), backbone(clips().flatten(0, 1)))
    assert features.shape == (2, FRAMES, backbone.grid**2, 32)  # (B, T, N, d)


def test_gradients_reach_every_side_parameter_and_no_backbone_parameter():
    backbone, side = build()
    run(backbone, side, clips()).logsumexp(-1).sum().backward()
    missing = [name for name, p in side.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"side parameters without gradient: {missing}"
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


def test_backbone_unchanged_by_training_steps():
    backbone, side = build()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(side.parameters(), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(run(backbone, side, clips()), torch.tensor([1, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not backbone.training  # train() cannot switch the frozen model out of eval mode
    backbone.train()
    assert not backbone.training


def test_taps_have_no_autograd_history():
    backbone, _ = build()
    for tap in backbone(clips().flatten(0, 1)):
        assert tap.grad_fn is None and not tap.requires_grad


@pytest.mark.parametrize("tap_every", [1, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_training_runs_the_frozen_backbone_first_evaluation_streams_its_taps(tap_every, grad):
    """Under autograd every tap is kept anyway: the frozen blocks all run before the first side block, so
    their transients never meet the side network's saved tensors. Without grad each side block runs as soon
    as its tap exists (and the tap is dropped after it). The logits are the same either way."""
    backbone, side = build(layers=4, tap_every=tap_every)
    order = []
    for index, layer in enumerate(backbone.blocks):
        layer.register_forward_hook(lambda *_, i=index: order.append(f"backbone{i}"))
    for index, block in enumerate(side.blocks):
        block.register_forward_hook(lambda *_, i=index: order.append(f"side{i}"))
    frames = clips()
    with torch.set_grad_enabled(grad):
        logits = run(backbone, side, frames)
    sides = [f"side{backbone.taps.index(i)}" for i in range(4) if i in backbone.taps]
    if grad:
        expected = [f"backbone{index}" for index in range(4)] + sides
    else:
        expected = []
        for index in range(4):
            expected.append(f"backbone{index}")
            if index in backbone.taps:
                expected.append(f"side{backbone.taps.index(index)}")
    assert order == expected
    with torch.set_grad_enabled(not grad):
        torch.testing.assert_close(run(backbone, side, frames), logits)


@contextmanager
def kept_for_backward(exclude=()):
    """While active: the distinct storages autograd keeps for backward, data pointer -> bytes (the storages of
    ``exclude`` left out)."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield kept


def saved_bytes(layers: int, tap_every: int) -> int:
    """Bytes of all tensors autograd keeps for backward during one training forward."""
    backbone, side = build(layers=layers, tap_every=tap_every)
    with kept_for_backward() as kept:
        run(backbone, side, clips()).sum()
    return sum(kept.values())


def test_frozen_depth_adds_no_saved_activation_memory():
    # Doubling the frozen depth with the same taps count saves exactly the same tensors...
    assert saved_bytes(layers=4, tap_every=2) == saved_bytes(layers=2, tap_every=1)
    # ...and tapping more blocks grows it by exactly one side block + tap per extra tap.
    one, two, four = saved_bytes(1, 1), saved_bytes(2, 1), saved_bytes(4, 1)
    per_tap = two - one
    assert per_tap > 0
    assert four == one + 3 * per_tap


def test_shift_class_token():
    cls = torch.arange(3, dtype=torch.float32).view(1, 3, 1).expand(1, 3, 4).clone()  # frame t holds value t
    shifted = shift_class_token(cls)
    assert shifted[0, :, :2].tolist() == [[1, 1], [2, 2], [0, 0]]  # first half from t+1, zero at the end
    assert shifted[0, :, 2:].tolist() == [[0, 0], [0, 0], [1, 1]]  # second half from t-1, zero at the start


def test_published_side_network_sizes():
    with torch.device("meta"):
        b16 = build_backbone(BackboneConfig(name="vit-b16"))
        side_b16 = build_side_network(SideConfig(width=320, num_classes=174), b16)
        l14 = build_backbone(BackboneConfig(name="vit-l14"))
        side_l14 = build_side_network(SideConfig(width=512, num_classes=174), l14)
    assert len(side_b16.blocks) == 12 and side_b16.blocks[0].attn.heads == 5
    assert len(side_l14.blocks) == 24 and side_l14.blocks[0].attn.heads == 8
    assert 19e6 < count_params(side_b16) < 24e6  # published: about 21M
    assert 95e6 < count_params(side_l14) < 110e6  # published: about 102M
    assert count_params(b16) == 0


def test_published_initialisation():
    _, side = build(layers=4, width=64)
    block = side.blocks[0]
    width, depth = 64, 4
    assert block.fusion.proj.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.1)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(
        width**-0.5 * (2 * depth) ** -0.5, rel=0.1
    )
    assert side.pos_embed.std().item() == pytest.approx(0.01, rel=0.1)  # one tensor shared by every block
    assert torch.equal(block.attn_norm.weight, torch.ones(width))


@pytest.mark.parametrize("name", ["tiny", "eva-tiny"])
def test_chunked_frozen_forward_gives_the_same_taps_with_a_smaller_transient(name):
    from trainer.memory import PeakMemory

    frames = clips().flatten(0, 1)  # 8 images: chunks of 3, 3 and 2
    torch.manual_seed(0)
    whole = build_backbone(BackboneConfig(name=name, tap_every=1))
    chunked = build_backbone(BackboneConfig(name=name, tap_every=1, forward_chunk=3))
    chunked.load_state_dict(whole.state_dict())
    for a, b in zip(whole(frames), chunked(frames), strict=True):
        torch.testing.assert_close(b, a)
    hidden = whole.embed(frames)
    peaks = []
    for model in (whole, chunked):
        with torch.no_grad(), PeakMemory() as tracker:
            model.chunked_block(model.blocks[0], hidden)
        peaks.append(tracker.peak)
    assert peaks[1] < peaks[0]


def test_sdpa_and_eager_backbones_agree():
    frames = clips().flatten(0, 1)
    torch.manual_seed(0)
    sdpa = build_backbone(BackboneConfig(name="tiny", attn_implementation="sdpa"))
    eager = build_backbone(BackboneConfig(name="tiny", attn_implementation="eager"))
    eager.load_state_dict(sdpa.state_dict())
    for a, b in zip(sdpa(frames), eager(frames), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["clip", "vision"])
def test_loads_local_pretrained_directory(tmp_path, layout):
    tiny = TINY_CLIP
    if layout == "clip":  # a full CLIP checkpoint directory, as published
        text = dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99
        )
        model = CLIPModel(CLIPConfig(vision_config=tiny, text_config=text, projection_dim=32))
        source = model.vision_model
    else:
        model = source = CLIPVisionModel(CLIPVisionConfig(**tiny))
    model.save_pretrained(tmp_path)
    backbone = build_backbone(BackboneConfig(name="tiny", pretrained=str(tmp_path), tap_layers=[1]))
    assert backbone.taps == [1]
    theirs_modules = (source.embeddings, source.pre_layrnorm, source.encoder, source.post_layernorm)
    for ours, theirs in zip(
        backbone.parameters(), [p for m in theirs_modules for p in m.parameters()], strict=True
    ):
        assert torch.equal(ours, theirs)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_meta_backbone_and_memory_plan_take_the_shape_of_a_pretrained_directory(tmp_path):
    from trainer.config import load_config
    from trainer.memory import plan_memory

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path)  # the "tiny" shape
    meta = meta_backbone(BackboneConfig(name="demo", pretrained=str(tmp_path)))  # the directory wins
    assert (meta.width, meta.num_layers) == (32, 2)
    assert all(p.is_meta for p in meta.parameters())
    absent = meta_backbone(BackboneConfig(name="vit-b16", pretrained=str(tmp_path / "absent")))
    assert (absent.width, absent.num_layers) == (768, 12)  # planned before the download
    plan = lambda *overrides: plan_memory(load_config(None, list(overrides)), 1, accelerator=False)
    assert plan(f"backbone.pretrained={tmp_path}") == plan("backbone.name=tiny") != plan()


def test_pretrained_directory_missing_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if "layers.1." not in k}
    save_file(dropped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"\d+ missing \['encoder\.layers\.1\."):
        build_backbone(BackboneConfig(name="tiny", pretrained=str(tmp_path)))


def test_checkpointed_side_blocks_give_the_same_step_with_fewer_saved_activations():
    from trainer.memory import PeakMemory

    backbone, plain = build(layers=4)
    checkpointed = build_side_network(SideConfig(width=32, num_classes=5, checkpoint=True), backbone)
    checkpointed.load_state_dict(plain.state_dict())
    frames = clips(batch=4)
    peaks = {}
    for name, side in (("plain", plain), ("checkpointed", checkpointed)):
        with PeakMemory() as tracker:
            run(backbone, side, frames).logsumexp(-1).sum().backward()
        peaks[name] = tracker.peak
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b), name  # batch-norm running statistics updated once, not again in recompute
    assert peaks["checkpointed"] < 0.7 * peaks["plain"], peaks


def _step_with_saved_bytes(backbone, side, frames) -> tuple[torch.Tensor, int]:
    """One training step; the bytes of the distinct storages its forward keeps for backward (parameters
    excluded)."""
    with kept_for_backward(side.parameters()) as kept:
        out = run(backbone, side, frames)
    out.logsumexp(-1).sum().backward()
    return out, sum(kept.values())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_recomputed_norms_and_chunked_mlp_give_the_same_step_keeping_less(checkpoint):
    backbone, _ = build(layers=3)
    frames = clips(batch=2)
    runs = {}
    for name, lean in (("plain", dict(mlp_chunk=0, recompute_norms=False)), ("lean", dict(mlp_chunk=50))):
        torch.manual_seed(1)
        cfg = SideConfig(width=32, num_classes=5, checkpoint=checkpoint, **lean)
        side = build_side_network(cfg, backbone)
        with torch.no_grad():  # norms away from their identity initialisation, so their gradients matter
            for module in side.modules():
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                    module.weight.normal_()
                    module.bias.normal_()
        runs[name] = side, *_step_with_saved_bytes(backbone, side, frames)
    (plain, plain_out, plain_saved), (lean, lean_out, lean_saved) = runs["plain"], runs["lean"]
    torch.testing.assert_close(lean_out, plain_out)
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), lean.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)  # running statistics updated once per step
    if not checkpoint:
        # per block at least: three norm outputs (the attention's over 1 + N tokens) and the GELU output
        batch_frames, patches, width = frames.shape[0] * FRAMES, backbone.grid**2, 32
        per_block = batch_frames * width * (2 * patches + (1 + patches) + 4 * patches) * 4
        assert plain_saved - lean_saved >= len(plain.blocks) * per_block


def test_recomputation_skips_the_last_mlp_gemm_and_the_last_block():
    """Checkpointing adds one forward of every side block but the last, less its MLP's second GEMM (the
    recomputation needs only what backward keeps)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone, _ = build(layers=3)
    frames = clips(batch=2)
    taps = list(backbone(frames.flatten(0, 1)))
    flops = {}
    for checkpoint in (False, True):
        torch.manual_seed(1)
        side = build_side_network(SideConfig(width=32, num_classes=5, checkpoint=checkpoint), backbone)
        with FlopCounterMode(display=False) as counter:
            side(frames, taps).logsumexp(-1).sum().backward()
        flops[checkpoint] = counter.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            side.blocks[0](torch.zeros(2, FRAMES, backbone.grid**2, 32), taps[0], side.pos_embed)
        block_forward = counter.get_total_flops()
    tokens, hidden = 2 * FRAMES * backbone.grid**2, 4 * 32
    second_gemm = 2 * tokens * hidden * 32
    assert flops[True] - flops[False] == (len(taps) - 1) * (block_forward - second_gemm)
