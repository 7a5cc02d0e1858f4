"""Frozen image backbones that hand their intermediate token states to a side network.

A backbone here is always frozen: eval mode, ``requires_grad_(False)``, forward under ``torch.no_grad()``.
``iter_taps`` runs the blocks one at a time and yields the tapped blocks' outputs as they appear, so a
side network can consume tap i before block i + 1 runs and the whole feature stack never exists at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

# Named CLIP vision shapes. The two published ones match OpenAI CLIP; "tiny" is for tests and "demo" is the
# small CLIP-shaped model the CPU demo trains beside.
CLIP_SIZES: dict[str, dict] = {
    "vit-b16": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=16,
        image_size=224,
        projection_dim=512,
    ),
    "vit-b32": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=32,
        image_size=224,
        projection_dim=512,
    ),
    "vit-l14": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    ),
    "demo": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        patch_size=16,
        image_size=96,
        projection_dim=128,
    ),
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        projection_dim=32,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Which frozen image model to build and which of its blocks feed the side network."""

    name: str = "demo"
    """Named size (see CLIP_SIZES); ignored for the architecture when ``pretrained_dir`` is set."""
    pretrained_dir: str | None = None
    """Local transformers directory (config.json + weights) of a CLIP or CLIPVision model; never downloads."""
    num_layers: int | None = None
    """Override the named size's depth (depth-reduced variants for tests and benchmarks)."""
    tap_every: int = 1
    """Tap every k-th block: blocks k-1, 2k-1, ... (k=2: the odd indices, as Side4Video taps ViT-E)."""
    tap_layers: list[int] = field(default_factory=list)
    """Explicit block indices to tap (0-based); overrides ``tap_every`` when non-empty."""
    dtype: str = "float32"
    """Dtype of the frozen weights and of the activations handed over."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel for the frozen blocks: sdpa or eager."""

    def __post_init__(self):
        if self.pretrained_dir is None and self.name not in CLIP_SIZES:
            raise ValueError(f"backbone.name: unknown size {self.name!r}; known: {sorted(CLIP_SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.tap_every < 1:
            raise ValueError(f"backbone.tap_every must be >= 1, got {self.tap_every}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"backbone.attn_implementation: {self.attn_implementation!r} is not sdpa or eager"
            )


def select_taps(num_layers: int, tap_every: int = 1, tap_layers: list[int] | None = None) -> list[int]:
    """Block indices to tap, sorted. ``tap_layers`` wins over ``tap_every``."""
    if tap_layers:
        taps = sorted(set(tap_layers))
        bad = [i for i in taps if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"backbone.tap_layers: {bad} out of range for a {num_layers}-block backbone")
        return taps
    taps = list(range(tap_every - 1, num_layers, tap_every))
    if not taps:
        raise ValueError(f"backbone.tap_every={tap_every} taps no block of a {num_layers}-block backbone")
    return taps


class FrozenCLIPVision(nn.Module):
    """transformers' CLIP vision tower, frozen, with taps on chosen blocks.

    Args:
        vision: a CLIPVisionModel (transformers 4.x keeps the tower under ``.vision_model``).
        taps: block indices whose outputs ``iter_taps`` yields.
    """

    def __init__(self, vision: CLIPVisionModel, taps: list[int]):
        super().__init__()
        tower = getattr(vision, "vision_model", vision)
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = tower.encoder.layers
        self.post_layernorm = tower.post_layernorm
        config: CLIPVisionConfig = vision.config
        self.width = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.taps = list(taps)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def train(self, mode: bool = True) -> FrozenCLIPVision:
        # Frozen: stays in eval mode whatever the caller asks (no dropout, fixed norms).
        return super().train(False)

    @torch.no_grad()
    def iter_taps(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the tapped blocks' outputs, in block order, as soon as each exists.

        Args:
            images: (B, 3, H, W) normalised pixels.
        Yields:
            (B, 1 + N, width) token states (class token first), no autograd history.
        """
        dtype = self.embeddings.patch_embedding.weight.dtype
        hidden = self.pre_layrnorm(self.embeddings(images.to(dtype)))  # (B, 1 + N, width)
        last = self.taps[-1]
        tapped = set(self.taps)
        for index, layer in enumerate(self.layers[: last + 1]):
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
            if index in tapped:
                yield hidden

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """All taps at once (tests and feature extraction; training uses ``iter_taps``)."""
        return list(self.iter_taps(images))


def clip_vision_config(cfg: BackboneConfig) -> CLIPVisionConfig:
    if cfg.pretrained_dir is not None:
        config = CLIPVisionConfig.from_pretrained(cfg.pretrained_dir, local_files_only=True)
    else:
        config = CLIPVisionConfig(**CLIP_SIZES[cfg.name])
    if cfg.num_layers is not None:
        config.num_hidden_layers = cfg.num_layers
    return config


def build_backbone(cfg: BackboneConfig) -> FrozenCLIPVision:
    """Build the frozen CLIP vision tower from a named size (random weights) or a local directory."""
    config = clip_vision_config(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.pretrained_dir is not None:
        path = Path(cfg.pretrained_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"backbone.pretrained_dir: no config.json in {path}")
        vision, info = CLIPVisionModel.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            attn_implementation=cfg.attn_implementation,
            output_loading_info=True,
        )
        # A full CLIPModel directory also holds the text tower (unexpected here, fine); a missing vision
        # weight would silently stay random, so it is an error.
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"backbone.pretrained_dir: {path} lacks {len(missing)} vision weights, e.g. {missing[:5]}"
            )
        vision = vision.to(dtype)
    else:
        config._attn_implementation = cfg.attn_implementation
        vision = CLIPVisionModel(config).to(dtype)
    taps = select_taps(config.num_hidden_layers, cfg.tap_every, cfg.tap_layers)
    return FrozenCLIPVision(vision, taps)
