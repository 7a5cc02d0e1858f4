"""Checkpoints of the trainable engine plus each rank's training state, never lost to a fault.

Layout: ``run_dir/checkpoints/step00000100/`` holds DeepSpeed's files (model, optimizer, scheduler), one
``train_state_rankNNNNN.json`` per rank (step, data position) and, written last, ``complete.json``: the
world size and every file's size. A save goes to ``stepN.saving/`` first; once every rank has written its
files, rank 0 writes the marker and renames the folder into place (an existing ``stepN/``, as when a
finished run saves again, is first renamed ``stepN.replaced/`` and deleted after the swap), then points
``latest`` at it and prunes checkpoints beyond ``checkpoint.keep``, older than the new one.

Resume trusts only checkpoints whose marker matches the files on disk (and whose torch files pass their
zip checksums), newest first: ``latest`` is informational and may be empty, garbage or missing. If the
newest fails to load, the previous intact one is tried, saying so. Nothing complete is ever deleted on
resume: only ``*.saving`` folders (interrupted saves). A checkpoint written before markers existed is
trusted when ``latest`` names it. The frozen backbone is not saved: it is rebuilt from its config.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from trainer.safe_load import CorruptFileError, UnsafeFileError, safe_torch_load, use_safe_loading

log = logging.getLogger(__name__)

MARKER = "complete.json"
SAVING, REPLACED = ".saving", ".replaced"
_CHECKPOINT = re.compile(r"step(\d{8})")


@dataclass
class CheckpointConfig:
    """When to save and what to resume from."""

    every: int = 0
    """Optimizer steps between checkpoints; 0 saves only at the end of training."""
    keep: int = 2
    """Newest complete checkpoints kept on disk (older ones are deleted once a newer save is complete)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run_dir/checkpoints when one exists."""

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


class CheckpointError(Exception):
    """A checkpoint could not be written or none of the existing ones can be resumed; one line for people."""


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted, or None when its marker matches its files."""
    marker = path / MARKER
    try:
        manifest = json.loads(marker.read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        return "no completion marker (its save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable completion marker ({exc})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _zip_problem(path: Path) -> str | None:
    """A torch file whose zip checksums fail (bit rot, a partial copy); None when all pass."""
    for file in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{file.name} is damaged ({exc})"
        if bad is not None:
            return f"{file.name} is damaged (checksum of {bad})"
    return None


def legacy_tag(checkpoints: Path) -> str | None:
    """What ``latest`` names, if it names an existing folder (checkpoints from before completion markers)."""
    try:
        tag = (checkpoints / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if _CHECKPOINT.fullmatch(tag) and (checkpoints / tag).is_dir() else None


def resume_candidates(checkpoints: Path) -> list[tuple[Path, str | None]]:
    """Every checkpoint folder, newest first, with why it cannot be used (None: it can)."""
    folders = sorted(
        (p for p in checkpoints.glob("step*") if p.is_dir() and _CHECKPOINT.fullmatch(p.name)), reverse=True
    )
    legacy = legacy_tag(checkpoints)
    result = []
    for path in folders:
        problem = checkpoint_problem(path)
        if problem and path.name == legacy and not (path / MARKER).exists():
            problem = None  # written before markers existed; a failed load still falls back
        result.append((path, problem or _zip_problem(path)))
    return result


def newest_complete(checkpoints: Path) -> Path | None:
    """The newest checkpoint folder that can be trusted (see ``resume_candidates``), or None."""
    return next((path for path, problem in resume_candidates(checkpoints) if problem is None), None)


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk; torch words it as a failed zip write."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    try:
        return shutil.disk_usage(path).free < 2**20
    except OSError:
        return False


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.dir = run_dir / "checkpoints"
        self.last: Path | None = None  # the newest complete checkpoint this run saved or resumed from

    def should_save(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, engine, step: int, train_state: dict) -> Path:
        """Save on every rank (DeepSpeed requires it) into a staging folder; swap it in once complete."""
        tag = f"step{step:08d}"
        final, staging = self.dir / tag, self.dir / f"{tag}{SAVING}"
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        barrier()
        try:
            engine.save_checkpoint(
                str(self.dir), tag=staging.name, client_state={"step": step}, save_latest=False
            )
            _atomic_write(staging / f"train_state_rank{self.dist.rank:05d}.json", json.dumps(train_state))
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            cause = "No space left on device" if disk_full(exc, self.dir) else f"{type(exc).__name__}: {exc}"
            kept = f"the last complete one, {self.last}, is intact" if self.last else "no earlier one exists"
            raise CheckpointError(
                f"saving checkpoint {final} failed: {cause}; the partial checkpoint was removed and {kept}"
            ) from exc
        barrier()
        if self.dist.is_main:
            files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
            manifest = {"step": step, "world_size": self.dist.world_size, "files": files}
            _atomic_write(staging / MARKER, json.dumps(manifest, indent=1))
            old = self.dir / f"{tag}{REPLACED}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            staging.rename(final)
            _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            _atomic_write(self.dir / "latest", tag)
            self._prune(newest=final)
        barrier()
        self.last = final
        return final

    def load(self, engine) -> dict | None:
        """Restore the newest complete checkpoint that loads into ``engine``; return this rank's state."""
        if self.dist.is_main:
            self._tidy()
        if not self.cfg.resume:
            return None
        candidates = broadcast_object(
            [(p.name, why) for p, why in resume_candidates(self.dir)] if self.dist.is_main else None
        )
        for index, (tag, problem) in enumerate(candidates):
            if problem:
                log.warning("not resuming from %s: %s", self.dir / tag, problem)
                continue
            error = self._load_one(engine, tag)
            failed = all_reduce_sum([float(error is not None)], self.dist.device)[0]
            if not failed:
                state = self._train_state(tag)
                if index:
                    log.warning("resumed from the older checkpoint %s (see above)", self.dir / tag)
                log.info("resumed from %s at step %d", self.dir / tag, state["step"])
                self.last = self.dir / tag
                return state
            log.warning(
                "checkpoint %s failed to load on %d rank(s)%s: falling back to the previous one",
                self.dir / tag,
                int(failed),
                f" ({error})" if error else "",
            )
        if candidates:
            listed = "; ".join(f"{tag}: {problem or 'failed to load'}" for tag, problem in candidates)
            raise CheckpointError(
                f"{self.dir} holds checkpoints but none can be resumed ({listed}); nothing was deleted. "
                "Move them away, or set checkpoint.resume=false to start afresh"
            )
        return None

    def _load_one(self, engine, tag: str) -> str | None:
        """Load ``tag`` into the engine; None when it loaded, else why not. Refused (unsafe) files raise."""
        use_safe_loading(engine)
        try:
            loaded, _ = engine.load_checkpoint(
                str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except UnsafeFileError:
            raise
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return None if loaded is not None else "DeepSpeed found no checkpoint files"

    def _train_state(self, tag: str) -> dict:
        state_file = self.dir / tag / f"train_state_rank{self.dist.rank:05d}.json"
        if state_file.is_file():
            return json.loads(state_file.read_text())
        log.warning(
            "%s has no state for rank %d (world size changed?): data restarts from its beginning",
            tag,
            self.dist.rank,
        )
        return {"step": int(tag[len("step") :])}

    def _tidy(self) -> None:
        """Drop interrupted saves; finish a swap that a kill interrupted (``stepN.replaced``)."""
        for path in self.dir.glob(f"step*{SAVING}"):
            log.warning("removing %s: its save was interrupted", path)
            shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(f"step*{REPLACED}"):
            final = path.with_name(path.name[: -len(REPLACED)])
            if not final.exists():
                path.rename(final)  # killed between the two renames: the replaced copy is complete
            elif checkpoint_problem(final) is None:
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, newest: Path) -> None:
        """Delete complete checkpoints older than the ``keep`` newest (``newest`` among them)."""
        folders = sorted((p for p in self.dir.glob("step*") if _CHECKPOINT.fullmatch(p.name)), reverse=True)
        complete = [p for p in folders if p <= newest and checkpoint_problem(p) is None]
        for old in complete[self.cfg.keep :]:
            shutil.rmtree(old, ignore_errors=True)


def read_module_state(path: str, key: str) -> dict[str, torch.Tensor]:
    """The model weights of a run directory's newest complete checkpoint (or a checkpoints folder's), a
    checkpoint directory, or a state-dict file
    (.pt / .bin with the weights at the top level or under "module", "model" or "state_dict"; .safetensors).

    ``key`` names the config field in errors.
    """
    source = Path(path)
    if source.is_dir():
        for checkpoints in (source / "checkpoints", source):
            newest = newest_complete(checkpoints) if checkpoints.is_dir() else None
            if newest is not None:
                source = newest
                break
        files = sorted(source.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{key}: {path} holds no complete checkpoint (no model states)")
        source = files[0]
    elif not source.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(source))
    try:  # a refused file (UnsafeFileError) is no config mistake: it propagates and stops the run
        state = safe_torch_load(source, key, deepspeed_file=True)  # DeepSpeed's files: 3 inert classes
    except CorruptFileError as exc:
        raise ValueError(f"{key}: {source} is not a torch checkpoint: {exc.why}") from None
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{key}: {source} does not hold a state dict of tensors")
    return state


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, flush it to disk and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
