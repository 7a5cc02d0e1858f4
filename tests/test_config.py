"""Config loading: defaults <- YAML <- overrides, and errors that name the key."""

from __future__ import annotations

import json

import pytest

from trainer.config import ConfigError, RunConfig, load_config, resolve_deepspeed_config


def test_defaults_yaml_and_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("side:\n  width: 64\ndata:\n  num_frames: 16\n")
    cfg = load_config(str(yaml_file), ["data.num_frames=12", "backbone.tap_layers=[1,3]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.side.width == 64 and cfg.data.num_frames == 12 and cfg.backbone.tap_layers == [1, 3]
    assert cfg.train.steps == RunConfig().train.steps


def test_repo_configs_load():
    for name in (
        "configs/demo.yaml",
        "configs/ssv2_vitb16.yaml",
        "configs/k400_vitl14.yaml",
        "configs/ssv2_vite14.yaml",
    ):
        load_config(name)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.stpes=3"], "train.stpes"),  # typo
        (["data.num_frames=eight"], "data.num_frames"),  # wrong type
        (["side.width=48", "side.heads=5"], "side.heads"),  # invalid value (post-init)
        (["backbone.name=vit-x"], "backbone.name"),
        (["side.logit_scale=150"], "side.logit_scale"),  # above the clamp
        (["side.mlp_chunk=-1"], "side.mlp_chunk"),
        (["backbone.forward_chunk=-1"], "backbone.forward_chunk"),
        (["nonsense=1"], "nonsense"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_yaml_typo_names_the_key(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(str(yaml_file))


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/none.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_deepspeed_auto_values_are_filled(tmp_path):
    cfg = load_config(None, ["data.batch_size=6", "train.grad_accum=3", "train.grad_clip=2.5"])
    ds = resolve_deepspeed_config(cfg, world_size=2, bf16_supported=True)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 36 and ds["gradient_clipping"] == 2.5 and ds["bf16"]["enabled"] is True
    assert resolve_deepspeed_config(cfg, 1, bf16_supported=False)["bf16"]["enabled"] is False


def test_deepspeed_contradiction_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, ["data.batch_size=4", f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        resolve_deepspeed_config(cfg, 1, False)


def test_side_network_under_zero3_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(None, [f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="stage 0-2"):
        resolve_deepspeed_config(cfg, 1, False)
