"""AdamW over the trainable parameters and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models import no_weight_decay


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (steps are optimizer steps)."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.15
    """Decoupled weight decay, not applied to norms, biases and position embeddings."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Linear warmup from 0 to ``lr``."""
    min_lr_ratio: float = 0.01
    """The cosine ends at ``lr * min_lr_ratio``."""

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_steps >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over parameters that require grad only; frozen ones never reach the optimizer."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step ``step``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total_steps))
