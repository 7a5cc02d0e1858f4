"""Config loading: defaults <- YAML <- overrides, and errors that name the key; DeepSpeed files; resuming."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trainer.config import (
    TRAINER_OWNED,
    ConfigError,
    RunConfig,
    check_deepspeed_config,
    check_deepspeed_files,
    deepspeed_top_level_keys,
    dump_config,
    load_config,
    read_deepspeed_json,
    resolve_deepspeed_config,
    resume_changes,
    shard_specs,
)
from trainer.optim import OptimConfig


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


# -- YAML files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  steps: [1\n", r"bad\.yaml, line 3, column 1: not valid YAML: did not find expected ','"),
        ("train:\n\tsteps: 3\n", r"bad\.yaml, line 2, column 1: not valid YAML"),  # a tab
        ("train:\n  steps: 3\ntrain:\n  steps: 4\n", r"bad\.yaml, line 3, .*duplicate key train"),
        ("- train\n- data\n", r"bad\.yaml: the top level must be a mapping .* not a list"),
        ("3\n", r"bad\.yaml: the top level must be a mapping .* not a single value"),
    ],
)
def test_a_yaml_file_that_is_no_config_mapping_is_one_error_naming_the_file(tmp_path, text, match):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ConfigError, match=match) as caught:
        load_config(str(yaml_file))
    assert "\n" not in str(caught.value) and str(yaml_file) in str(caught.value)


def test_an_empty_yaml_file_is_the_defaults(tmp_path):
    yaml_file = tmp_path / "empty.yaml"
    yaml_file.write_text("# nothing set\n")
    assert load_config(str(yaml_file)) == RunConfig()


# -- DeepSpeed JSON files ------------------------------------------------------------------------------------


def test_deepspeed_keys_come_from_the_installed_deepspeed():
    keys = deepspeed_top_level_keys()
    assert {"zero_optimization", "gradient_clipping", "bf16", "train_micro_batch_size_per_gpu"} <= keys
    assert {"wall_clock_breakdown", "aio", "tensorboard", "steps_per_print"} <= keys
    assert not {"zero_optimisation", "gradient_cliping", "stage", "enabled"} & keys


@pytest.mark.parametrize("path", sorted(Path("deepspeed_configs").glob("*.json")), ids=lambda p: p.name)
def test_the_repository_deepspeed_configs_pass(path):
    key = "train.frozen_deepspeed_config" if path.name.startswith("frozen") else "train.deepspeed_config"
    assert read_deepspeed_json(path, key) == json.loads(path.read_text())


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        (
            {"zero_optimisation": {"stage": 2}},
            'unknown key "zero_optimisation", which DeepSpeed .* would ignore '
            r'\(did you mean "zero_optimization"\?\)',
        ),
        ({"gradient_cliping": 1.0}, r'unknown key "gradient_cliping".*did you mean "gradient_clipping"'),
        ({"no_such_thing": 1}, r'unknown key "no_such_thing", which DeepSpeed \S+ would ignore$'),
        (
            {"zero_optimization": {"stag": 2}},
            r'unknown key "zero_optimization.stag" \(did you mean "zero_optimization.stage"\?\)$',
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"devic": "cpu"}}},
            r'unknown key "zero_optimization.offload_param.devic" '
            r'\(did you mean "zero_optimization.offload_param.device"\?\)',
        ),
        ({"zero_optimization": {"nonsense": 1}}, r'unknown key "zero_optimization.nonsense"$'),
        ({"tensorboard": {"enabeld": True}}, r'unknown key "tensorboard.enabeld".*"tensorboard.enabled"'),
        ({"bf16": {"enabled": "auto", "enabeld": True}}, r'unknown key "bf16.enabeld"'),
        ({"zero_optimization": {"stage": "two"}}, r"zero_optimization.stage: Input should be .*'two'"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "DeepSpeed refuses it: .*simultaneously"),
        ({"amp": {"enabled": True}}, ".*Apex AMP integration has been removed"),  # DeepSpeed's own message
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
            r'"optimizer" would be ignored: the trainer builds AdamW itself; remove the section and set '
            r"optim\.lr, optim\.weight_decay, optim\.betas, optim\.eps",
        ),
        ({"scheduler": {"type": "WarmupLR"}}, r'"scheduler" would be ignored.*optim\.warmup_steps'),
    ],
)
def test_deepspeed_configs_are_checked_key_by_key(ds, message):
    with pytest.raises(ConfigError, match=r"^train\.deepspeed_config: ds\.json: " + message) as caught:
        check_deepspeed_config(ds, "train.deepspeed_config: ds.json")
    assert "\n" not in str(caught.value)


def test_auto_values_and_deprecated_nested_keys_pass():
    ds = {
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "cpu_offload": False},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
    check_deepspeed_config(ds, "train.deepspeed_config: ds.json")


def test_the_frozen_engine_takes_no_optimizer():
    with pytest.raises(ConfigError, match='"optimizer": the frozen engine trains nothing'):
        check_deepspeed_config({"optimizer": {}}, "f.json", trains=False)


def test_deepspeed_files_are_read_strictly(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match=r'ds\.json: key "zero_optimization" appears twice'):
        read_deepspeed_json(path, "train.deepspeed_config")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        read_deepspeed_json(path, "train.deepspeed_config")
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}))
    cfg = load_config(None, [f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=r'^train\.deepspeed_config: .*"zero_optimization.overlap_comm"'):
        resolve_deepspeed_config(cfg, 1, False)
    frozen = tmp_path / "frozen.json"
    frozen.write_text(json.dumps({"zero_optimization": {"stage": 3}, "zero_optimisation": {}}))
    cfg = load_config(None, [f"train.frozen_deepspeed_config={frozen}"])
    with pytest.raises(ConfigError, match=r"^train\.frozen_deepspeed_config: .*zero_optimisation"):
        check_deepspeed_files(cfg)
    check_deepspeed_files(load_config(None, [f"train.frozen_deepspeed_config={frozen}", "model=video_swin"]))


def test_the_trainer_owned_settings_exist():
    fields = {f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)}
    assert {key for _, keys in TRAINER_OWNED.values() for key in keys} <= fields


# -- which shards a run reads -------------------------------------------------------------------------------


def test_shard_specs_follow_the_task():
    assert set(shard_specs(load_config(None, []))) == {"data.train_shards", "data.eval_shards"}
    bevt = ["task=bevt", "model=video_swin", "data.image_shards=i.tar"]
    assert set(shard_specs(load_config(None, [*bevt, "bevt.stage=image"]))) == {"data.image_shards"}
    joint = shard_specs(load_config(None, [*bevt, "data.image_eval_shards=e.tar"]))
    assert set(joint) == {f"data.{k}_shards" for k in ("train", "eval", "image", "image_eval")}


# -- resuming with a changed config --------------------------------------------------------------------------


def _trained_run(tmp_path, *overrides: str):
    """A run directory as a finished run leaves it: its config.yaml and one checkpoint folder."""
    cfg = load_config(None, [f"run_dir={tmp_path}", *overrides])
    dump_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    return cfg


def test_resuming_with_a_changed_shape_names_the_keys(tmp_path):
    _trained_run(tmp_path, "side.width=32")
    before = (tmp_path / "config.yaml").read_text()
    changed = ["side.width=48", "side.num_classes=10", "data.batch_size=2"]
    cfg = load_config(None, [f"run_dir={tmp_path}", *changed])
    with pytest.raises(ConfigError) as caught:
        resume_changes(cfg)
    message = str(caught.value)
    assert message.startswith("side.width: 32 -> 48, side.num_classes: 8 -> 10: the checkpoint being resumed")
    assert "step00000002" in message and "batch_size" not in message and "\n" not in message
    assert (tmp_path / "config.yaml").read_text() == before  # nothing moved


def test_resuming_with_a_changed_batch_size_keeps_the_old_config(tmp_path):
    _trained_run(tmp_path, "data.batch_size=4")
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.batch_size=2", "train.seed=7"])
    changes = resume_changes(cfg)
    assert changes.changed == {"data.batch_size": (4, 2), "train.seed": (0, 7)}
    assert changes.describe() == (
        "resuming step00000002 with changed settings (old -> new): "
        "data.batch_size: 4 -> 2; train.seed: 0 -> 7"
    )
    kept = changes.keep_previous()
    assert kept == tmp_path / "config.until-step00000002.yaml"
    assert (tmp_path / "config.yaml").exists()  # kept as a copy: config.yaml never goes missing
    assert "batch_size: 4" in kept.read_text()
    dump_config(cfg, tmp_path / "config.yaml")
    assert resume_changes(cfg) is None  # the same settings again: nothing to say
    dump_config(load_config(None, [f"run_dir={tmp_path}"]), tmp_path / "config.yaml")
    assert resume_changes(cfg).keep_previous() == tmp_path / "config.until-step00000002.1.yaml"


def test_resume_is_compared_only_when_a_checkpoint_is_resumed(tmp_path):
    _trained_run(tmp_path)
    shape = [f"run_dir={tmp_path}", "side.width=48"]
    assert resume_changes(load_config(None, [*shape, "checkpoint.resume=false"])) is None
    (tmp_path / "checkpoints" / "step00000002").rename(tmp_path / "checkpoints" / "step00000004.saving")
    assert resume_changes(load_config(None, shape)) is None  # only an interrupted save
    # Keys of a model the run does not build can change: text.* is read by retrieval only.
    (tmp_path / "checkpoints" / "step00000002").mkdir()
    changes = resume_changes(load_config(None, [f"run_dir={tmp_path}", "text.random_token_std=1.0"]))
    assert changes.changed == {"text.random_token_std": (0.0, 1.0)}


def test_a_key_the_old_config_lacks_is_a_change_that_can_resume(tmp_path):
    _trained_run(tmp_path)
    text = (tmp_path / "config.yaml").read_text().replace("  forward_chunk: 0\n", "")
    (tmp_path / "config.yaml").write_text(text)
    changes = resume_changes(load_config(None, [f"run_dir={tmp_path}", "backbone.forward_chunk=4"]))
    assert "backbone.forward_chunk: (not in the old config) -> 4" in changes.describe()


@pytest.mark.parametrize(
    ("rule", "decayed"),
    [
        ("default", {"fc.weight", "mask_token"}),  # (a 3-D token: only 1-D tensors and named embeddings skip)
        (
            "all",
            {
                "fc.weight",
                "fc.bias",
                "norm.weight",
                "norm.bias",
                "pos_embed",
                "mask_token",
                "relative_position_bias_table",
            },
        ),
        ("bevt", {"fc.weight", "fc.bias", "pos_embed", "mask_token"}),
    ],
)
def test_optim_decay_picks_the_decayed_parameters(rule, decayed):
    import torch
    from torch import nn

    from trainer.optim import OptimConfig, build_optimizer

    model = nn.Module()
    model.fc, model.norm = nn.Linear(2, 2), nn.LayerNorm(2)
    for name in ("pos_embed", "mask_token", "relative_position_bias_table"):
        model.register_parameter(name, nn.Parameter(torch.zeros(1, 2, 2)))
    optimizer = build_optimizer(OptimConfig(decay=rule), model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {
        names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]
    }
    assert got == decayed
