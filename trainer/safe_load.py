"""Loading torch files without running code from them.

A torch file is a pickle, and unpickling can call any function the file names. Every torch file the project
reads (frozen weights, ``swin.init_from``, tokenizers, resumed checkpoints) goes through ``safe_torch_load``:
``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain containers and refuses
anything else. DeepSpeed's own checkpoints also hold three inert DeepSpeed classes (``DEEPSPEED_CLASSES``);
those, and only those, are allowed in files DeepSpeed wrote. ``use_safe_loading`` makes a DeepSpeed engine
read its checkpoints this way (DeepSpeed itself loads them with ``weights_only=False``).

Two failures, told apart so that a resume can fall back on a damaged checkpoint but never on a planted one:
``UnsafeFileError`` (refused: the pickle names something that is not weights; stop) and ``CorruptFileError``
(unreadable: truncated, not a zip, not a torch file at all). Both messages are one line naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

# The non-tensor classes DeepSpeed 0.19 pickles into its own checkpoints for this project's configurations
# (ZeRO stage 0/1/2, bf16 or fp32), found by saving real engines and reading the files back with
# weights_only=True. All three are plain data, rebuilt by the unpickler from their fields without running
# any of their methods. Stage 0 files (model + optimizer) hold none; ZeRO 1/2 optimizer files hold all three.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # "zero_stage": an int enum
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # "loss_scaler": the static scale (1.0 for bf16/fp32)
    "deepspeed.utils.tensor_fragment.fragment_address",  # "param_slice_mappings": (numel, start) per weight
)

_NOTE = "only weights are loaded (weights_only=True)"


class UnsafeFileError(Exception):
    """A torch file refused because its pickle holds more than weights; nothing in it was run."""

    def __init__(self, path: str | Path, what: str, why: str):
        self.path, self.what, self.why = str(path), what, why
        super().__init__(_one_line(self.path, what, "refused", why))


class CorruptFileError(ValueError):
    """A file that is not a readable torch file (truncated, not a zip, not a pickle): damaged, not hostile."""

    def __init__(self, path: str | Path, what: str, why: str):
        self.path, self.what, self.why = str(path), what, why
        super().__init__(_one_line(self.path, what, "unreadable", why))


def safe_torch_load(path: str | Path, what: str, *, mmap: bool = False, deepspeed_file: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only.

    Args:
        what: what the file is for (a config key such as "swin.init_from"); starts the error messages.
        mmap: memory-map the tensors (zip-format files only; older files are read whole).
        deepspeed_file: a checkpoint DeepSpeed wrote: also allow ``DEEPSPEED_CLASSES``.
    Raises:
        UnsafeFileError: the pickle names a class or function outside the allowlist (nothing was run).
        CorruptFileError: the file is not a readable torch file.
        FileNotFoundError: there is no such file.
    """
    allowed = list(_deepspeed_classes()) if deepspeed_file else []
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # torch refuses to mmap the legacy format
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        reason = _torch_reason(exc)
        # Refused unless the bytes are no pickle at all: a damaged pickle stops the run too (the safe side).
        if _is_pickle(path) or not reason.startswith(("Unsupported operand", "String is too long")):
            raise UnsafeFileError(path, what, _refusal(path, reason, allowed)) from None
        # A text file or garbage stops torch's unpickler at its first byte.
        raise CorruptFileError(path, what, f"not a torch file ({reason})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, KeyError ... on damaged files
        raise CorruptFileError(path, what, f"not a complete torch file ({_first_line(exc)})") from None


def use_safe_loading(engine, what: str = "checkpoint") -> None:
    """Make ``engine.load_checkpoint`` read every file through ``safe_torch_load`` (DeepSpeed's own files).

    Replaces ``engine.checkpoint_engine`` (DeepSpeed's TorchCheckpointEngine, which every DeepSpeed read of
    a checkpoint goes through for ZeRO 0-2: model states, ZeRO optimizer partitions) with a subclass whose
    ``load`` is safe; saving is unchanged. Idempotent. Afterwards ``engine.load_checkpoint`` raises
    ``UnsafeFileError`` or ``CorruptFileError`` naming the file (a missing file counts as corrupt: the
    checkpoint is incomplete). ``what`` starts those messages.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    safe = _safe_engine_class()
    if isinstance(current, safe):
        current.what = what
        return
    if type(current) is not TorchCheckpointEngine:
        # DeepSpeed's other engines (fast/decoupled writers, DataStates) read files their own way.
        raise TypeError(
            f"checkpoint engine {type(current).__name__}: only DeepSpeed's TorchCheckpointEngine loads "
            'safely; drop "checkpoint": {"writer": ...} or "datastates_ckpt" from the DeepSpeed config'
        )
    engine.checkpoint_engine = safe(current, what)


@functools.cache
def _safe_engine_class() -> type:
    # Defined on first use: importing DeepSpeed at module level would make every weights load import it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's TorchCheckpointEngine with a ``load`` that runs no code from the file."""

        def __init__(self, base: TorchCheckpointEngine, what: str):
            # Take over the configured engine's settings (zipfile serialization, name) rather than re-deriving
            # them from the DeepSpeed config; TorchCheckpointEngine.__init__ would only log again.
            self.__dict__.update(vars(base))
            self.what = what

        def load(self, path: str, map_location=None):
            # map_location is not needed: DeepSpeed asks for the CPU (or for storages as read, which is the
            # CPU) and moves the tensors itself.
            try:
                return safe_torch_load(path, self.what, deepspeed_file=True)
            except FileNotFoundError:
                raise CorruptFileError(path, self.what, "missing (an incomplete checkpoint)") from None

    return SafeTorchCheckpointEngine


@functools.cache
def _deepspeed_classes() -> tuple[type, ...]:
    classes = []
    for name in DEEPSPEED_CLASSES:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return tuple(classes)


def _refusal(path: str | Path, reason: str, allowed: list[type]) -> str:
    """Why a file was refused: the classes/functions its pickle names that are not allowed."""
    names: list[str] = []
    with contextlib.suppress(Exception):  # reads the pickle's opcodes without running them (zip format)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    permitted = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
    # What torch itself rebuilds (tensors, OrderedDict): a plain pickle names them too. A private table,
    # used for the message only.
    permitted |= set(getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)())
    names = sorted(set(names or _stream_globals(path)) - permitted)
    if not names:  # legacy torch format: torch's message names the first global it met
        found = re.search(r"GLOBAL (\S+)", reason)
        names = [found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"] if found else []
    if len(names) == 1:
        return f"it holds a pickled object of type '{names[0]}' that is not a tensor/plain container; {_NOTE}"
    if names:
        listed = ", ".join(f"'{name}'" for name in names)
        return f"it holds pickled objects of types {listed} that are not tensors/plain containers; {_NOTE}"
    return f"its pickle does what a file of weights does not ({reason}); {_NOTE}"


def _stream_globals(path: str | Path) -> list[str]:
    """The globals a plain pickle stream (``pickle.dump``, not ``torch.save``) names: read, never run."""
    names, memo, last = [], {}, None
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for op, arg, _ in pickletools.genops(handle):  # parses; builds and calls nothing
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name == "MEMOIZE" or op.name.endswith("PUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = last
                    continue
                elif op.name.endswith("GET"):
                    last = memo.get(arg)
                    if isinstance(last, str):
                        strings.append(last)
                    continue
                last = arg if isinstance(arg, str) else None  # (GLOBAL and INST are handled above)
                if isinstance(last, str):
                    strings.append(last)
    except Exception:  # not (or not only) a pickle: what was found so far stands
        pass
    return names


def _torch_reason(exc: BaseException) -> str:
    """The unpickler's own reason inside torch's multi-paragraph weights_only message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Please use `torch|\n\n|$)", text, re.S)
    if found is None:
        found = re.search(r"(Trying to load unsupported GLOBAL .+?)(?:\n|$)", text)
    if found is not None:
        reason = found.group(1)
    else:
        reason = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return " ".join(reason.split()).rstrip(".")


def _is_pickle(path: str | Path) -> bool:
    """A zip-format torch file, or a pickle stream (protocol 2+ opens with the PROTO opcode)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80" or zipfile.is_zipfile(path)
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text.split(". ", 1)[0].rstrip(".")  # torch's zip errors go on with paragraphs of advice
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(path: str, what: str, verdict: str, why: str) -> str:
    why = " ".join(why.split())
    return f"{what}: {path}: {verdict}: {why}" if what else f"{path}: {verdict}: {why}"
