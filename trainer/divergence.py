"""Divergence: a step whose loss or gradient norm is not finite is detected on every rank and not applied.

DeepSpeed's ZeRO stage 1/2 optimizer already skips a step whose global gradient norm is not finite (it
zeroes the gradients and counts the step as skipped), and that norm is all-reduced, so every rank skips
together. Two gaps remain, closed here:
- a non-finite loss need not give a non-finite gradient (an infinite logit's softmax has finite
  gradients): ``poisoned`` multiplies such a loss by NaN, so its gradients are NaN and the step is skipped;
- BatchNorm updates its running statistics in the forward pass, before anyone knows the step is bad:
  ``DivergenceGuard`` snapshots the network's buffers before a step and restores them after a bad one.
After ``max_bad_steps`` bad steps in a row the run stops with ``DivergenceError``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _NormBase

from trainer.config import ConfigError
from trainer.distributed import all_reduce_sum


class DivergenceError(Exception):
    """Training diverged; the message names the step and the last good checkpoint."""


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged when finite, else NaN with NaN gradients everywhere (no device sync)."""
    return loss * torch.where(torch.isfinite(loss), 1.0, math.nan).to(loss.dtype)


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in module.state_dict().items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


class DivergenceGuard:
    """Counts consecutive bad steps (agreed on by every rank) and undoes their buffer updates."""

    def __init__(self, engine, max_bad_steps: int, device: torch.device):
        if not hasattr(engine.optimizer, "overflow"):
            raise ConfigError(
                "train.deepspeed_config: its optimizer cannot skip a non-finite step (ZeRO stage 0); "
                "use ZeRO stage 1 or 2, e.g. deepspeed_configs/side_zero2.json"
            )
        self.engine, self.max_bad_steps, self.device = engine, max_bad_steps, device
        self.consecutive = 0
        self.total = 0
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_step(self) -> None:
        """Remember the buffers the coming forward passes update (in place): normalisation layers' running
        statistics."""
        self._saved = [
            (buffer, buffer.detach().clone())
            for module in self.engine.module.modules()
            if isinstance(module, _NormBase)
            for buffer in module.buffers(recurse=False)
        ]

    def after_step(self, loss: float, step: int, last_checkpoint: Path | None) -> bool:
        """True if the step just taken was bad (non-finite loss on any rank, or skipped by the optimizer);
        raises ``DivergenceError`` after ``max_bad_steps`` bad steps in a row."""
        votes = all_reduce_sum([float(not math.isfinite(loss))], self.device)[0]
        bad = votes > 0 or not self.engine.was_step_applied()
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        with torch.no_grad():
            for buffer, saved in self._saved:
                buffer.copy_(saved)
        if self.consecutive >= self.max_bad_steps:
            raise DivergenceError(
                f"training diverged: {self.consecutive} steps in a row up to step {step} had a non-finite "
                f"loss or gradient norm and were not applied (train.max_bad_steps={self.max_bad_steps}); "
                f"last good checkpoint: {last_checkpoint or 'none'}. Lower optim.lr or check the data."
            )
        return True
