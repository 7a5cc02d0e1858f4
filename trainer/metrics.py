"""Run-directory metrics: metrics.jsonl, TensorBoard events and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass
class MetricsConfig:
    """What is logged and how often."""

    log_every: int = 10
    """Optimizer steps between metrics.jsonl / TensorBoard records."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self):
        if self.log_every < 1:
            raise ValueError(f"metrics.log_every must be >= 1, got {self.log_every}")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def strict_record(record: dict) -> dict:
    """``record`` with NaN and infinities as null, named in ``"nonfinite"``: strict JSON readers refuse the
    bare ``NaN``/``Infinity`` Python writes."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, run_dir: Path, is_main: bool, total_steps: int, start_step: int):
        self.cfg, self.is_main = cfg, is_main
        self._file = self._writer = self._bar = None
        if not is_main:
            return
        self._file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every == 0

    def step_done(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)

    def log(self, step: int, values: dict) -> None:
        """Write one record; ``values`` are already reduced across ranks."""
        if not self.is_main:
            return
        record = strict_record({"step": step, **values})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._bar is not None and "loss" in values:
            parts = [f"loss {values['loss']:.3f}"]
            if "clips_per_s" in values:
                parts.append(f"{values['clips_per_s']:.1f} clips/s")
            if "peak_mem_gb" in values:
                parts.append(f"mem {values['peak_mem_gb']:.2f} GB")
            self._bar.set_postfix_str(", ".join(parts))

    def write(self, message: str) -> None:
        if self.is_main:
            (self._bar.write if self._bar is not None else print)(message)

    def close(self) -> None:
        for handle in (self._bar, self._writer, self._file):
            if handle is not None:
                handle.close()
