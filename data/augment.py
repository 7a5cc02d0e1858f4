"""Training augmentation in batch on the accelerator (kornia): random resized crop, flip, colour jitter and
RandAugment, drawn once per clip and applied alike to all its frames.

Workers then only decode (at ``data.decode_size``) and ship uint8 frames; the crop and the photometric
work run on the device, where they cost little next to the model. The CPU path (crop and flip in the
workers, ``data.augment_on=cpu``) stays the default.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.container.params import ParamItem
from torch import nn

from data.shards import DataConfig


class DeviceAugment(nn.Module):
    """uint8 (B, T, 3, H, W) decoded clips -> uint8 (B, T, 3, size, size) augmented clips."""

    def __init__(self, cfg: DataConfig, size: int):
        super().__init__()
        ops: list[nn.Module] = [
            K.RandomResizedCrop((size, size), scale=tuple(cfg.train_scale), ratio=tuple(cfg.train_ratio))
        ]
        if cfg.hflip:
            ops.append(K.RandomHorizontalFlip())
        if cfg.color_jitter:
            s = cfg.color_jitter
            ops.append(K.ColorJitter(s, s, s, s / 4, p=0.8))
        self.video = K.VideoSequential(*ops, data_format="BTCHW", same_on_frame=True)
        count, magnitude = cfg.randaugment
        self.randaugment = RandAugment(n=count, m=magnitude) if count else None

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.video(frames.float() / 255)  # (B, T, 3, size, size) in [0, 1]
        if self.randaugment is not None:
            x = torch.stack([self._randaugment_clip(clip) for clip in x])
        return (x * 255).round_().clamp_(0, 255).to(torch.uint8)

    def _randaugment_clip(self, clip: torch.Tensor) -> torch.Tensor:
        """RandAugment with one draw for the clip: parameters drawn for one image, repeated for each frame."""
        params = self.randaugment.forward_parameters(torch.Size((1, *clip.shape[1:])))
        return self.randaugment(clip, params=[_repeat(p, clip.shape[0]) for p in params])


def _repeat(item: ParamItem, frames: int) -> ParamItem:
    data = item.data
    if isinstance(data, list):
        data = [_repeat(p, frames) for p in data]
    elif isinstance(data, dict):
        data = {
            k: v.expand(frames, *v.shape[1:]) if torch.is_tensor(v) and v.dim() and v.shape[0] == 1 else v
            for k, v in data.items()
        }
    return ParamItem(item.name, data)
