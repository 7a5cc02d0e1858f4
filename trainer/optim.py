"""AdamW over the trainable parameters and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models import no_weight_decay

BEVT_NO_DECAY = ("norm", "relative_position_bias_table", "absolute_pos_embed")
DECAY_RULES = {  # (name, parameter) -> whether weight decay applies
    "default": lambda name, param: not no_weight_decay(name, param),
    "all": lambda name, param: True,
    "bevt": lambda name, param: not any(part in name for part in BEVT_NO_DECAY),
}


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (steps are optimizer steps)."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.15
    """Decoupled weight decay, on the parameters ``decay`` picks."""
    decay: str = "default"
    """Which parameters are decayed: default (all but norms, biases, position embeddings and bias tables),
    all (every one, as Side4Video's release), bevt (all but those named *norm*, relative_position_bias_table
    or absolute_pos_embed, as BEVT's release: linear biases and the mask token are decayed)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Linear warmup to ``lr`` over this many optimizer steps (a recipe's warmup epochs x steps per epoch)."""
    min_lr_ratio: float = 0.01
    """The cosine ends at ``lr * min_lr_ratio`` at ``train.steps`` (0: to 0, as Side4Video's release)."""

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("optim.lr must be > 0, optim.weight_decay and optim.warmup_steps >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.decay not in DECAY_RULES:
            raise ValueError(f"optim.decay: {self.decay!r} is not one of {tuple(DECAY_RULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW over parameters that require grad only; frozen ones never reach the optimizer."""
    decay, no_decay = [], []
    decayed = DECAY_RULES[cfg.decay]
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decayed(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (decay=all leaves one): DeepSpeed's ZeRO optimizer drops it, and the schedule built for
    # the optimizer's groups would then no longer match them.
    groups = [group for group in groups if group["params"]]
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
