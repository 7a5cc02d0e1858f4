"""Checkpoints of the side-network engine plus each rank's training state.

Layout: ``run_dir/checkpoints/step00000100/`` holds DeepSpeed's files (model, optimizer, scheduler) and one
``train_state_rankNNNNN.json`` per rank (step, data position). ``latest`` names the newest checkpoint and is
written only after every rank has finished writing, so an interrupted save never becomes the one resumed.
The frozen backbone is not saved: it is rebuilt from its config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


@dataclass
class CheckpointConfig:
    """When to save and what to resume from."""

    every: int = 0
    """Optimizer steps between checkpoints; 0 saves only at the end of training."""
    keep: int = 2
    """Newest checkpoints kept on disk (older ones are deleted after a complete save)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.dir = run_dir / "checkpoints"

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def latest_tag(self) -> str | None:
        latest = self.dir / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def save(self, engine, step: int, train_state: dict) -> Path:
        """Save on every rank (DeepSpeed requires it); mark complete once all ranks are done."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": step}, save_latest=False)
        path = self.dir / tag
        _atomic_write(path / f"train_state_rank{self.dist.rank:05d}.json", json.dumps(train_state))
        barrier()
        if self.dist.is_main:
            _atomic_write(self.dir / "latest", tag)
            self._prune(keep_tag=tag)
        barrier()
        return path

    def load(self, engine) -> dict | None:
        """Restore the newest complete checkpoint into ``engine``; return this rank's training state."""
        latest = self.latest_tag()
        if self.dist.is_main:
            self._drop_incomplete(latest)
        tag = latest if self.cfg.resume else None
        if tag is None:
            return None
        loaded, client = engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} named by 'latest' could not be loaded")
        state_file = self.dir / tag / f"train_state_rank{self.dist.rank:05d}.json"
        if state_file.is_file():
            state = json.loads(state_file.read_text())
        else:
            log.warning(
                "%s has no state for rank %d (world size changed?): data restarts from its beginning",
                tag,
                self.dist.rank,
            )
            state = {"step": client["step"]}
        log.info("resumed from %s at step %d", self.dir / tag, state["step"])
        return state

    def _drop_incomplete(self, latest: str | None) -> None:
        """Delete checkpoints newer than ``latest``: saves interrupted before every rank had finished."""
        for path in sorted(self.dir.glob("step*")):
            if path.is_dir() and (latest is None or path.name > latest):
                log.warning("removing %s: its save was interrupted (not named by 'latest')", path)
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[: -self.cfg.keep]:
            if old.name != keep_tag:
                shutil.rmtree(old, ignore_errors=True)


def read_module_state(path: str, key: str) -> dict[str, torch.Tensor]:
    """The model weights of a run directory's latest checkpoint, a checkpoint directory, or a state-dict file
    (.pt / .bin with the weights at the top level or under "module", "model" or "state_dict"; .safetensors).

    ``key`` names the config field in errors.
    """
    source = Path(path)
    if source.is_dir():
        checkpoints = source / "checkpoints"
        if (checkpoints / "latest").is_file():
            source = checkpoints / (checkpoints / "latest").read_text().strip()
        elif (source / "latest").is_file():
            source = source / (source / "latest").read_text().strip()
        files = sorted(source.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(
                f"{key}: {path} holds no complete checkpoint (no latest, no model states)"
            )
        source = files[0]
    elif not source.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(source))
    try:
        state = torch.load(source, map_location="cpu", weights_only=False)  # DeepSpeed's files hold objects
    except Exception as exc:
        raise ValueError(f"{key}: {source} is not a torch checkpoint: {exc}") from None
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{key}: {source} does not hold a state dict of tensors")
    return state


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
