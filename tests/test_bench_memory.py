"""Baseline methods for the memory benchmark, Side4Video's lean switches, and a smoke run of the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from launch.bench_memory import LEAN_SWITCHES, parse_args, with_lean_switches
from models import BackboneConfig, build_backbone
from models.baselines import METHODS, AIMNet, LinearProbe, STAdapterNet
from models.side4video import TapFusion
from tests.conftest import REPO
from trainer.benchmark import BenchConfig, MasterWeightAdamW, build_method

BACKBONES = ["tiny", "eva-tiny"]  # pre-norm CLIP and post-norm EVA blocks


def clips(batch: int = 2, frames: int = 3, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, frames, 3, size, size)  # (B, T, 3, H, W)


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_and_mlp_branches_compose_to_the_block(name):
    backbone = build_backbone(BackboneConfig(name=name))
    hidden = backbone.embed(clips().flatten(0, 1))
    for block in backbone.blocks:
        expected = backbone.run_block(block, hidden)
        mid = hidden + backbone.attention_branch(block, hidden)
        torch.testing.assert_close(mid + backbone.mlp_branch(block, mid), expected)
        hidden = expected


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "frozen"])
def test_every_method_trains_its_own_parameters_and_no_frozen_one(name, method):
    model = build_method(BenchConfig(method=method, backbone=name, frames=3, num_classes=5))
    frames = clips()
    logits = model(frames)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{method}: {pname} got no gradient"
        else:
            assert param.grad is None
    trainable_backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    assert bool(trainable_backbone) == (method == "full_finetune")
    if method in ("st_adapter", "aim"):
        # The first block's adapter learns only through every frozen block above it.
        first = model.adapters[0] if method == "st_adapter" else model.spatial[0]
        assert first.up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_zero_initialised_adapters_leave_the_frozen_model_unchanged(name):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name=name))
    probe = LinearProbe(backbone, 5)
    frames = clips()
    for adapted in (STAdapterNet(backbone, 5), AIMNet(backbone, 5)):
        adapted.head.load_state_dict(probe.head.state_dict())
        torch.testing.assert_close(adapted(frames), probe(frames))


def test_side_lean_switches_keep_the_outputs():
    """Checkpointing, eager attention, the chunked MLP, recomputed norms and the frozen blocks run a few
    images at a time change memory, not what is computed."""
    frames = clips()
    reference = build_method(BenchConfig(method="side4video:checkpoint=0", backbone="tiny", num_classes=5))
    expected = reference(frames)
    F.cross_entropy(expected, torch.tensor([0, 3])).backward()
    specs = ("side4video", "side4video:attention=eager", "side4video:attention=eager,checkpoint=0")
    specs += (
        "side4video:mlp_chunk=0,recompute_norms=0",
        "side4video:mlp_chunk=3",
        "side4video:frozen_chunk=4",
    )
    for spec in specs:
        model = build_method(BenchConfig(method=spec, backbone="tiny", num_classes=5))
        model.load_state_dict(reference.state_dict())
        out = model(frames)
        torch.testing.assert_close(out, expected)
        F.cross_entropy(out, torch.tensor([0, 3])).backward()
        for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, msg=f"{spec}: {pname}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tap_fusion_keeps_only_the_handed_over_tap_and_matches_plain_autograd(dtype):
    torch.manual_seed(0)
    fusion = TapFusion(48, 16)
    with torch.no_grad():
        fusion.norm.weight.normal_()
        fusion.norm.bias.normal_()
    tap = torch.randn(6, 5, 48).to(dtype)  # (B*T, 1 + N, W), no autograd history

    def loss_and_grads(tokens):
        cls, patches = fusion(tokens, 3)
        loss = cls.sum() * 2 + (patches**2).sum()
        return cls, torch.autograd.grad(loss, list(fusion.parameters()))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cls, grads = loss_and_grads(tap)
    plain_cls, plain_grads = loss_and_grads(tap.float().requires_grad_())  # plain LayerNorm + Linear
    torch.testing.assert_close(cls, plain_cls)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, atol=1e-5, rtol=1e-4)
    wide = [t for t in saved if t.shape[-1] == 48 and t.ndim == 3]
    assert len(wide) == 1 and wide[0].dtype == dtype  # the tap itself, nothing W wide in float32


def test_master_weight_adamw_updates_low_precision_weights_from_float32_copies():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    optimizer = MasterWeightAdamW(list(layer.parameters()), lr=0.1)
    before = layer.weight.detach().clone()
    layer(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad is None
    assert optimizer.master[0].dtype == torch.float32
    torch.testing.assert_close(layer.weight, optimizer.master[0].to(torch.bfloat16))
    assert not torch.equal(layer.weight, before)


def test_bad_method_or_option_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="not one of"):
        BenchConfig(method="lora")
    with pytest.raises(ValueError, match="unknown options"):
        BenchConfig(method="side4video:chekpoint=0")
    done = subprocess.run(
        [sys.executable, "-m", "launch.bench_memory", "--methods", "aim,lora", "--backbones", "tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "lora" in done.stderr and "Traceback" not in done.stderr


def test_benchmark_smoke(tmp_path):
    """Two batch sizes x three methods, each in its own process: records, tables, ratios and the plot."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.bench_memory",
            "--methods",
            "frozen,side4video,aim",
            "--backbones",
            "tiny",
            "--frames",
            "3",
            "--batch",
            "1,2",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["batch"]) for r in records] == [
        (m, b) for b in (1, 2) for m in ("frozen", "side4video", "aim")
    ]
    for r in records:
        assert r["peak_bytes"] > 0 and r["rss_peak_bytes"] > 0 and r["step_seconds"] > 0
        assert r["peak_by_category"]["parameters"] > 0 and r["forward_gflops"] > 0
        assert (r["trainable_params"] > 0) == (r["method"] != "frozen")
        if r["method"] != "frozen":
            assert r["peak_by_category"]["optimizer"] > 0 and r["peak_by_category"]["activations"] > 0
    table = (out / "results.md").read_text()
    assert "peak / aim" in table and "step / frozen" in table
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "[6/6]" in done.stderr  # progress


def test_method_lists_keep_each_methods_options_and_lean_flips_each_switch_once():
    args = parse_args(["--methods", "frozen:handover=bfloat16,side4video:handover=bfloat16,checkpoint=0,aim"])
    assert args.methods == ["frozen:handover=bfloat16", "side4video:handover=bfloat16,checkpoint=0", "aim"]
    flipped = with_lean_switches(["frozen", "side4video:handover=bfloat16"])
    base = "side4video:handover=bfloat16"
    expected = [f"{base},{s}" for s in LEAN_SWITCHES if not s.startswith("handover=")]
    assert flipped == ["frozen", base, *expected]
    assert with_lean_switches(["side4video"]) == ["side4video", *(f"side4video:{s}" for s in LEAN_SWITCHES)]
    for method in flipped:  # every flipped spec is a valid configuration
        BenchConfig(method=method)
