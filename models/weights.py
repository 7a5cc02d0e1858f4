"""Reading checkpoints lazily and loading them into a module one piece at a time.

Peak host memory stays near one piece (the embeddings, one block, ...) rather than the whole model:
safetensors files are read tensor by tensor, and torch pickles (.pt/.bin) are memory-mapped, read with
``weights_only=True`` (``trainer.safe_load``): a file whose pickle holds more than weights is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from trainer.safe_load import safe_torch_load


class CheckpointReader:
    """Tensors of a checkpoint by name, read on demand.

    Accepts a .safetensors file, a .pt/.pth/.bin torch file (optionally nested under "state_dict", "model" or
    "module"), or a transformers directory (model.safetensors, a sharded index, or pytorch_model.bin).
    ``what`` (what the weights are for) starts the message of a refused or unreadable torch file.
    """

    def __init__(self, path: str | Path, what: str = "frozen weights"):
        path = Path(path)
        self.path = path
        self._files: dict[str, Path] = {}
        self._torch: dict[str, torch.Tensor] | None = None
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {key: path / name for key, name in weight_map.items()}
            elif (path / "model.safetensors").is_file():
                path = path / "model.safetensors"
            elif (path / "pytorch_model.bin").is_file():
                path = path / "pytorch_model.bin"
            else:
                raise FileNotFoundError(f"{self.path}: no model.safetensors, index or pytorch_model.bin")
        if not self._files and path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), path)
        elif not self._files:
            state = safe_torch_load(path, what, mmap=True)  # raises UnsafeFileError / CorruptFileError
            for nested in ("state_dict", "model", "module"):
                if isinstance(state, dict) and isinstance(state.get(nested), dict):
                    state = state[nested]
            self._torch = state

    def names(self) -> list[str]:
        return list(self._torch) if self._torch is not None else list(self._files)

    def get(self, key: str) -> torch.Tensor:
        if self._torch is not None:
            return self._torch[key]
        with safe_open(self._files[key], framework="pt") as handle:
            return handle.get_tensor(key)


def pieces(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Loading units: each element of a ModuleList (a block), and every other top-level child whole."""
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            for index, element in enumerate(child):
                yield f"{prefix}{name}.{index}.", element
        else:
            yield f"{prefix}{name}.", child


def load_weights(
    module: nn.Module,
    reader: CheckpointReader,
    prefixes: tuple[str, ...],
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
    writer: bool = True,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Copy ``reader``'s tensors into ``module`` piece by piece.

    Args:
        prefixes: checkpoint key prefixes to strip, tried in order (e.g. "visual." then "").
        gather: context making a piece's parameters whole while written (for partitioned parameters).
        writer: whether this process reads and writes (others only take part in ``gather``).
        rename: maps the module's parameter names to the checkpoint's (after the prefix).
    Raises:
        KeyError: listing every missing and unexpected key at once, before anything is loaded.
    """
    rename = rename or (lambda name: name)
    expected = {rename(name): name for name, _ in module.named_parameters()}
    available: dict[str, str] = {}
    for key in reader.names():
        for prefix in prefixes:
            if key.startswith(prefix):
                available.setdefault(key[len(prefix) :], key)
                break
    missing = sorted(set(expected) - set(available))
    # Keys under the tower's own prefix that fit nothing are suspicious; a full CLIP also holds a text tower.
    own = [p for p in prefixes if p]
    unexpected = sorted(
        k for k, full in available.items() if k not in expected and (not own or full.startswith(own[0]))
    )
    if missing or unexpected:
        raise KeyError(
            f"{reader.path} does not match the {type(module).__name__} it is loaded into: "
            f"{len(missing)} missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    gather = gather or (lambda params: nullcontext())
    for prefix, piece in pieces(module):
        params = list(piece.named_parameters(prefix=prefix.rstrip(".")))
        with gather([p for _, p in params]):
            if writer:
                for name, param in params:
                    tensor = reader.get(available[rename(name)])
                    if tensor.shape != param.shape:
                        raise ValueError(
                            f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                        )
                    param.data.copy_(tensor.to(param.dtype))


def fit_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """What keeps ``given`` from loading strictly where ``expected`` (a state dict) is: the missing,
    unexpected and differently shaped tensors by name; empty lists when it fits."""
    return {
        "missing": sorted(expected.keys() - given.keys()),
        "unexpected": sorted(given.keys() - expected.keys()),
        "of another shape": [
            f"{key} {tuple(given[key].shape)} != {tuple(value.shape)}"
            for key, value in expected.items()
            if key in given and given[key].shape != value.shape
        ],
    }
