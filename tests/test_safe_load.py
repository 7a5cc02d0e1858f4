"""No stranger's code: every torch file the project loads is read with weights_only=True.

A planted pickle whose unpickling would touch a marker file is offered at every loading path (frozen
weights, swin.init_from as a file and as a run directory, both tokenizers, the launch tools, a resume's model
and optimizer files): each is refused with one line naming the file, and the marker never appears. Real
DeepSpeed checkpoints of this project's configurations still load, identically, through the safe engine.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from models.backbone import BackboneConfig, build_backbone
from models.tokenizers import TokenizerConfig, build_tokenizer
from models.weights import CheckpointReader
from tests.conftest import launch, tiny_overrides
from trainer.checkpoint import read_module_state
from trainer.safe_load import (
    DEEPSPEED_CLASSES,
    CorruptFileError,
    UnsafeFileError,
    safe_torch_load,
    use_safe_loading,
)

REFUSED = "refused: it holds pickled objects of types 'builtins.getattr', 'pathlib.Path'"


class _TouchOnLoad:
    """Unpickling this calls ``Path.touch(marker)``: proof that a loader ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def plant(marker):
    """``plant(path)`` writes a weights-shaped file whose unpickling touches ``marker``; returns ``path``."""

    def write(path: Path, legacy: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"module": {"weight": torch.zeros(2)}, "extra": _TouchOnLoad(marker)}
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
        return path

    return write


def assert_refused(excinfo: pytest.ExceptionInfo, path: Path, marker: Path, what: str = "") -> None:
    message = str(excinfo.value)
    assert "\n" not in message and f"{path}: refused: " in message, message
    assert message.startswith(f"{what}: {path}: ") if what else True, message
    assert excinfo.value.path == str(path)
    assert not marker.exists()


# -- the loader itself ---------------------------------------------------------------------------------------


def test_the_planted_file_is_armed(plant, marker, tmp_path):
    """The payload does run under weights_only=False (what DeepSpeed and read_module_state used)."""
    torch.load(plant(tmp_path / "armed.pt"), weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the pickle.dump form
@pytest.mark.parametrize("form", ["zip", "legacy", "pickle.dump", "os.system"])
def test_safe_torch_load_refuses_objects_in_one_line(plant, marker, tmp_path, form):
    path = tmp_path / "weights.pt"
    if form == "pickle.dump":  # not a torch.save file at all: protocol 5, framed
        path.write_bytes(pickle.dumps(_TouchOnLoad(marker), protocol=5))
        expected = "'pathlib.Path.touch'"
    elif form == "os.system":
        payload = type("System", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})
        torch.save(payload(), path)
        expected = "a pickled object of type 'posix.system' that is not a tensor/plain container"
    else:
        plant(path, legacy=form == "legacy")
        expected = REFUSED if form == "zip" else "a pickled object of type 'builtins.getattr'"
    with pytest.raises(UnsafeFileError) as excinfo:
        safe_torch_load(path, "some.key", mmap=True)
    assert_refused(excinfo, path, marker, "some.key")
    assert expected in str(excinfo.value)
    assert str(excinfo.value).endswith("only weights are loaded (weights_only=True)")


def test_damaged_files_are_told_from_refused_ones(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.arange(1000.0)}, good)
    assert torch.equal(safe_torch_load(good, "k")["weight"], torch.arange(1000.0))
    truncated, text, empty = tmp_path / "truncated.pt", tmp_path / "text.pt", tmp_path / "empty.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    text.write_text("not a torch file")
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(
            CorruptFileError, match=rf"^k: {re.escape(str(path))}: unreadable: not a "
        ) as info:
            safe_torch_load(path, "k")
        assert not isinstance(info.value, UnsafeFileError) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "absent.pt", "k")


# -- every loading path --------------------------------------------------------------------------------------


def test_frozen_weights_are_refused(plant, marker, tmp_path):
    """backbone.pretrained (.pt), a transformers directory's pytorch_model.bin (the CLIP and text towers)."""
    path = plant(tmp_path / "vit.pt")
    with pytest.raises(UnsafeFileError) as excinfo:
        build_backbone(BackboneConfig(name="tiny", pretrained=str(path)))
    assert_refused(excinfo, path, marker, "frozen weights")
    directory = tmp_path / "clip"
    path = plant(directory / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError) as excinfo:
        CheckpointReader(directory)
    assert_refused(excinfo, path, marker)


def test_swin_init_from_is_refused_as_a_file_and_as_a_run_directory(plant, marker, tmp_path):
    path = plant(tmp_path / "swin.pt")
    with pytest.raises(UnsafeFileError) as excinfo:
        read_module_state(str(path), "swin.init_from")
    assert_refused(excinfo, path, marker, "swin.init_from")
    run = tmp_path / "run"
    path = plant(run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("step00000004")
    with pytest.raises(UnsafeFileError) as excinfo:
        read_module_state(str(run), "swin.init_from")
    assert_refused(excinfo, path, marker, "swin.init_from")


@pytest.mark.parametrize("kind", ["kmeans", "dvae"])
def test_tokenizer_files_are_refused(plant, marker, tmp_path, kind):
    path = plant(tmp_path / f"{kind}.pt")
    with pytest.raises(UnsafeFileError) as excinfo:
        build_tokenizer(TokenizerConfig(kind=kind, path=str(path), dvae_hidden=4, vocab_size=16))
    assert_refused(excinfo, path, marker, "bevt.tokenizer.path")


def test_launch_tools_refuse_in_one_line(plant, marker, tmp_path, tiny_shards, capsys):
    from launch import convert_checkpoint, fit_tokenizer

    path = plant(tmp_path / "eva.pt")
    assert convert_checkpoint.main(["--src", str(path), "--out", str(tmp_path / "out.safetensors")]) == 1
    shards = str(tiny_shards / "train-000000.tar")
    args = ["--shards", shards, "--backbone", "tiny", "--pretrained", str(path), "--workers", "0"]
    assert fit_tokenizer.main([*args, "--out", str(tmp_path / "codebook.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(f"{path}: refused" in line for line in lines), lines
    assert lines[0].startswith(f"error: --src: {path}: refused: ")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# -- DeepSpeed's checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _process_group():
    """A one-rank process group in this process (DeepSpeed needs one), torn down after the module."""
    from trainer.distributed import destroy, init_distributed

    saved, threads = dict(os.environ), torch.get_num_threads()
    dist = init_distributed()
    added = {key: value for key, value in os.environ.items() if saved.get(key) != value}
    # Runs launched meanwhile must not inherit RANK / MASTER_PORT (they would join this group's port).
    os.environ.clear()
    os.environ.update(saved)
    yield dist, added
    destroy()
    torch.set_num_threads(threads)


@pytest.fixture
def distributed(_process_group, monkeypatch):
    """The process group, with its launcher variables set for this test only (DeepSpeed reads them)."""
    dist, added = _process_group
    for key, value in added.items():
        monkeypatch.setenv(key, value)
    return dist


def side_engine(stage: int, seed: int = 0):
    """The side-network engine as the trainer builds it (AdamW, warmup-cosine LambdaLR), fp32 on the CPU."""
    import deepspeed

    from models import SideConfig, build_side_network
    from trainer.optim import OptimConfig, build_optimizer, build_scheduler

    torch.manual_seed(seed)
    backbone = build_backbone(BackboneConfig(name="tiny"))
    network = build_side_network(SideConfig(width=32, num_classes=8), backbone)
    optimizer = build_optimizer(OptimConfig(), network)
    scheduler = build_scheduler(OptimConfig(warmup_steps=2), optimizer, 8)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=network, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, backbone


def train_steps(engine, backbone, steps: int = 2) -> None:
    for _ in range(steps):
        clips = torch.randn(2, 4, 3, 32, 32)
        with torch.no_grad():
            taps = list(backbone(clips.flatten(0, 1)))
        loss = nn.functional.cross_entropy(engine(clips, iter(taps)).float(), torch.tensor([1, 5]))
        engine.backward(loss)
        engine.step()


def saved_checkpoint(stage: int, directory: Path) -> tuple[object, Path]:
    engine, backbone = side_engine(stage)
    train_steps(engine, backbone)
    engine.save_checkpoint(str(directory), tag="step00000002", client_state={"step": 2}, save_latest=False)
    return engine, directory / "step00000002"


def assert_same(a, b, where: str = "") -> None:
    """Nested state dicts equal: tensors exactly, other values by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # LossScaler: compare its fields
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


@pytest.mark.parametrize("stage", [0, 2])
def test_a_real_checkpoint_loads_back_identically_through_the_safe_engine(distributed, tmp_path, stage):
    saved, folder = saved_checkpoint(stage, tmp_path)
    engine, _ = side_engine(stage, seed=1)
    use_safe_loading(engine)
    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append((Path(args[0]).name, kwargs.get("weights_only")))
        return original(*args, **kwargs)

    torch.load = recording  # every read DeepSpeed makes while loading, whoever makes it
    try:
        loaded, client = engine.load_checkpoint(str(tmp_path), tag=folder.name)
    finally:
        torch.load = original
    assert loaded is not None and client["step"] == 2
    # DeepSpeed reads the model states twice (a check of its world size, then the load); ZeRO adds its
    # optimizer partition. All through the safe engine.
    expected = {"mp_rank_00_model_states.pt"} | (
        {"zero_pp_rank_0_mp_rank_00_optim_states.pt"} if stage else set()
    )
    assert {name for name, _ in calls} == expected and all(safe for _, safe in calls), calls
    assert_same(saved.module.state_dict(), engine.module.state_dict(), "module")
    assert_same(saved.optimizer.state_dict(), engine.optimizer.state_dict(), "optimizer")
    assert_same(saved.lr_scheduler.state_dict(), engine.lr_scheduler.state_dict(), "lr_scheduler")
    assert engine.global_steps == saved.global_steps == 2
    engine.save_checkpoint(str(tmp_path), tag="again", save_latest=False)  # saving is DeepSpeed's, unchanged
    assert engine.load_checkpoint(str(tmp_path), tag="again")[0] is not None


def test_the_allowlist_is_what_deepspeed_writes_for_our_configurations(distributed, tmp_path):
    """ZeRO 0/1/2 x fp32/bf16: the union of non-tensor globals in DeepSpeed's files is DEEPSPEED_CLASSES."""
    import deepspeed

    found = set()
    for stage in (0, 1, 2):
        for bf16 in (False, True):
            torch.manual_seed(0)  # a plain network: CPU batch norm has no bf16 kernel for the side network
            network = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
            config = {
                "train_micro_batch_size_per_gpu": 2,
                "bf16": {"enabled": bf16},
                "zero_optimization": {"stage": stage},
                "steps_per_print": 10**9,
            }
            optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
            engine, *_ = deepspeed.initialize(model=network, optimizer=optimizer, config=config)
            loss = engine(torch.randn(2, 8, dtype=torch.bfloat16 if bf16 else torch.float32)).float().sum()
            engine.backward(loss)
            engine.step()
            directory = tmp_path / f"zero{stage}-{'bf16' if bf16 else 'fp32'}"
            engine.save_checkpoint(str(directory), tag="t")
            for file in sorted((directory / "t").glob("*.pt")):
                names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
                assert names <= set(DEEPSPEED_CLASSES), (file.name, names)
                found |= names
                safe_torch_load(file, "checkpoint", deepspeed_file=True)
            use_safe_loading(engine)
            assert engine.load_checkpoint(str(directory), tag="t")[0] is not None
    assert found == set(DEEPSPEED_CLASSES)


def test_planted_resume_files_are_refused(distributed, plant, marker, tmp_path):
    """The model states and the ZeRO optimizer partition of a run's checkpoint, swapped for the payload:
    the safe engine refuses either; a damaged or missing one is CorruptFileError (resume may fall back)."""
    from trainer.checkpoint import CheckpointConfig, Checkpointer

    _, folder = saved_checkpoint(2, tmp_path / "clean")
    engine, _ = side_engine(2, seed=1)
    use_safe_loading(engine)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        checkpoints = tmp_path / name / "checkpoints"
        shutil.copytree(folder, checkpoints / folder.name)
        path = plant(checkpoints / folder.name / name)
        with pytest.raises(UnsafeFileError) as excinfo:
            engine.load_checkpoint(str(checkpoints), tag=folder.name)
        assert_refused(excinfo, path, marker, "checkpoint")
        (checkpoints / "latest").write_text(folder.name)  # as a checkpoint from before completion markers
        with pytest.raises(UnsafeFileError) as excinfo:  # the trainer's resume stops too: no fallback
            Checkpointer(CheckpointConfig(), checkpoints.parent, distributed).load(engine)
        assert_refused(excinfo, path, marker, "checkpoint")

    optimizer = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=f"^checkpoint: {re.escape(str(optimizer))}: unreadable: "):
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
    optimizer.unlink()
    with pytest.raises(
        CorruptFileError, match=f"^checkpoint: {re.escape(str(optimizer))}: unreadable: missing"
    ):
        engine.load_checkpoint(str(folder.parent), tag=folder.name)


# -- through the entry point, as real processes --------------------------------------------------------------


def assert_one_line_exit(result, path: Path, marker: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if f"{path}: refused: " in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_train_refuses_a_planted_swin_init_from(plant, marker, tiny_shards, tmp_path):
    path = plant(tmp_path / "swin.pt")
    extra = {"model": "video_swin", "swin.name": "test", "swin.image_size": 32, "swin.init_from": str(path)}
    result = launch(tiny_overrides(tiny_shards, tmp_path / "run", **extra), timeout=120)
    assert_one_line_exit(result, path, marker)


def test_train_refuses_a_planted_resume_checkpoint(plant, marker, tiny_shards, tmp_path):
    """The newest checkpoint's model states replaced: the run stops with one line rather than fall back."""
    from trainer.checkpoint import resume_candidates

    checkpoints = tmp_path / "run" / "checkpoints"
    path = plant(checkpoints / "step00000002" / "mp_rank_00_model_states.pt")
    (checkpoints / "latest").write_text("step00000002")  # trusted like a checkpoint from before markers
    assert resume_candidates(checkpoints) == [(checkpoints / "step00000002", None)]
    result = launch(tiny_overrides(tiny_shards, tmp_path / "run"), timeout=120)
    assert_one_line_exit(result, path, marker)
