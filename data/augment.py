"""Training augmentation beyond the crop: RandAugment on one clip in the workers (``ClipRandAugment``, the
CPU path) and the whole batch's augmentation on the accelerator through kornia (``DeviceAugment``).

Both draw once per clip and apply that draw alike to all its frames. On the CPU path (``data.augment_on:
cpu``, the default) a worker crops, flips and RandAugments each clip; with ``augment_on: device`` the workers
only decode (at ``data.decode_size``) and flip, and the crop and photometric work run in batch on the
device, where they cost little next to the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # data.shards imports this module for the workers' RandAugment
    from kornia.augmentation.container.params import ParamItem

    from data.shards import DataConfig

MAX_MAGNITUDE = 30  # the magnitude scale of data.randaugment, kornia's (timm's m7 of 10 is 21 here)
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")
SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's SMOOTH kernel (/ 13), for sharpness


# -- RandAugment in the workers ------------------------------------------------------------------------------
# Each op maps (T, 3, H, W) float frames holding integers in [0, 255] to the same; ``level`` is the magnitude
# as a fraction of its maximum, signed for the ops that go both ways. Statistics (autocontrast, equalize,
# contrast) are per frame, as when the op is applied to each frame as an image; the draw is the clip's.


def _identity(x: torch.Tensor, level: float) -> torch.Tensor:
    return x


def _autocontrast(x: torch.Tensor, level: float) -> torch.Tensor:
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)  # (T, 3, 1, 1)
    spread = high - low
    return torch.where(spread > 0, (x - low) * (255 / spread.clamp(min=1)), x)


def _equalize(x: torch.Tensor, level: float) -> torch.Tensor:
    """Histogram equalisation of each frame's channel (PIL's: bins spread by cumulative count)."""
    values = x.to(torch.int64).flatten(2).flatten(0, 1)  # (T*3, H*W)
    hist = torch.zeros(values.shape[0], 256, dtype=torch.int64).scatter_add_(
        1, values, torch.ones_like(values)
    )
    last = 255 - (hist > 0).flip(1).to(torch.int8).argmax(1, keepdim=True)  # the highest occupied bin
    step = (values.shape[1] - hist.gather(1, last)) // 255  # (T*3, 1)
    below = hist.cumsum(1) - hist  # pixels under each bin
    lut = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256).expand_as(lut))  # one value: left as it is
    return lut.gather(1, values).view_as(x).to(x.dtype)


def _solarize(x: torch.Tensor, level: float) -> torch.Tensor:
    threshold = 256 * (1 - level)  # level 0: nothing inverted
    return torch.where(x >= threshold, 255 - x, x)


def _posterize(x: torch.Tensor, level: float) -> torch.Tensor:
    dropped = 2 ** int(4 * level)  # 8 bits kept at level 0, 4 at the maximum
    return torch.div(x, dropped, rounding_mode="floor") * dropped


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)  # (T, 1, H, W)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, level: float) -> torch.Tensor:
    """PIL's ImageEnhance: factor 1 keeps ``x``, 0 gives ``degenerate``; factor = 1 + 0.9 level."""
    return degenerate + (1 + 0.9 * level) * (x - degenerate)


def _color(x: torch.Tensor, level: float) -> torch.Tensor:
    return _blend(_gray(x), x, level)


def _contrast(x: torch.Tensor, level: float) -> torch.Tensor:
    return _blend(_gray(x).round().mean((1, 2, 3), keepdim=True), x, level)


def _brightness(x: torch.Tensor, level: float) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, level)


def _sharpness(x: torch.Tensor, level: float) -> torch.Tensor:
    kernel = torch.tensor(SMOOTH, dtype=x.dtype).div(13).expand(3, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=3).round()  # the border stays unfiltered
    return _blend(smooth, x, level)


def _affine(x: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Warp every frame by ``matrix`` (2, 3), which maps an output pixel (from the centre) to its input
    pixel; black fill."""
    height, width = x.shape[-2:]
    to_pixels = np.diag([width / 2, height / 2, 1.0])  # grid_sample's [-1, 1] coordinates -> centred pixels
    theta = np.diag([2 / width, 2 / height]) @ matrix @ to_pixels  # (2, 3) in normalised coordinates
    theta = torch.tensor(theta, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotate(x: torch.Tensor, level: float) -> torch.Tensor:
    angle = math.radians(30 * level)
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(x, np.array([[cos, -sin, 0.0], [sin, cos, 0.0]]))


def _shear_x(x: torch.Tensor, level: float) -> torch.Tensor:
    return _affine(x, np.array([[1.0, 0.3 * level, 0.0], [0.0, 1.0, 0.0]]))


def _shear_y(x: torch.Tensor, level: float) -> torch.Tensor:
    return _affine(x, np.array([[1.0, 0.0, 0.0], [0.3 * level, 1.0, 0.0]]))


def _translate_x(x: torch.Tensor, level: float) -> torch.Tensor:
    return _affine(x, np.array([[1.0, 0.0, -0.45 * level * x.shape[-1]], [0.0, 1.0, 0.0]]))


def _translate_y(x: torch.Tensor, level: float) -> torch.Tensor:
    return _affine(x, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -0.45 * level * x.shape[-2]]]))


# name -> (op, whether its magnitude takes a random sign). Maxima as in RandAugment (Cubuk et al.):
# rotate 30 degrees, shear 0.3, translate 0.45 of the side, enhance factors 1 +- 0.9, posterize to 4 bits.
RANDAUGMENT_OPS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], bool]] = {
    "identity": (_identity, False),
    "autocontrast": (_autocontrast, False),
    "equalize": (_equalize, False),
    "rotate": (_rotate, True),
    "solarize": (_solarize, False),
    "color": (_color, True),
    "posterize": (_posterize, False),
    "contrast": (_contrast, True),
    "brightness": (_brightness, True),
    "sharpness": (_sharpness, True),
    "shear_x": (_shear_x, True),
    "shear_y": (_shear_y, True),
    "translate_x": (_translate_x, True),
    "translate_y": (_translate_y, True),
}


class ClipRandAugment:
    """RandAugment of one uint8 clip (T, 3, H, W): ``ops`` operations drawn uniformly with replacement from
    ``RANDAUGMENT_OPS``, each applied with probability 0.5 (as timm's RandAugment, whose policy string
    "rand-m7-n4-mstd0.5-inc1" the release passes; its magnitude noise, mstd, is not drawn here), at
    ``magnitude`` / 30 of its maximum with a random sign where the op goes both ways. One draw per clip
    (from ``rng``, so a resumed run repeats it), applied alike to every frame.
    """

    def __init__(self, ops: int, magnitude: int):
        self.ops, self.level = ops, magnitude / MAX_MAGNITUDE
        self.names = list(RANDAUGMENT_OPS)

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """The clip's operations and signed levels, in order (skipped ones left out)."""
        chosen = []
        for _ in range(self.ops):
            name = self.names[int(rng.integers(len(self.names)))]
            apply, negative = rng.random() < 0.5, rng.random() < 0.5
            if apply:
                signed = RANDAUGMENT_OPS[name][1]
                chosen.append((name, -self.level if signed and negative else self.level))
        return chosen

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        chosen = self.draw(rng)
        if not chosen:
            return clip
        x = clip.float()
        for name, level in chosen:
            x = RANDAUGMENT_OPS[name][0](x, level).round_().clamp_(0, 255)
        return x.to(torch.uint8)


# -- the device path -----------------------------------------------------------------------------------------


class DeviceAugment(nn.Module):
    """uint8 (B, T, 3, H, W) decoded clips -> uint8 (B, T, 3, size, size): random resized crop, colour jitter
    and kornia's RandAugment. The horizontal flip is not here: the workers flip (before this crop, which is
    mirror-symmetric in distribution, so the order does not matter) where the label can follow it."""

    def __init__(self, cfg: DataConfig, size: int):
        super().__init__()
        import kornia.augmentation as K  # kornia is imported where the device path is built, not in workers
        from kornia.augmentation.auto import RandAugment

        ops: list[nn.Module] = [
            K.RandomResizedCrop((size, size), scale=tuple(cfg.train_scale), ratio=tuple(cfg.train_ratio))
        ]
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
    from kornia.augmentation.container.params import ParamItem

    data = item.data
    if isinstance(data, list):
        data = [_repeat(p, frames) for p in data]
    elif isinstance(data, dict):
        data = {
            k: v.expand(frames, *v.shape[1:]) if torch.is_tensor(v) and v.dim() and v.shape[0] == 1 else v
            for k, v in data.items()
        }
    return ParamItem(item.name, data)
