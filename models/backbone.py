"""Frozen image backbones that hand their intermediate token states to a side network.

A backbone here is always frozen: eval mode, ``requires_grad_(False)``, forward under ``torch.no_grad()``.
``forward(images)`` returns an iterator that runs the blocks one at a time and yields each tapped block's
output as it appears, so a side network can consume tap i before block i + 1 runs and the whole feature stack
never exists at once. Every parameter lives in a submodule whose own forward uses it (no parameter is read
outside its module's forward), which is what lets ZeRO-3 gather the weights block by block.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from models.eva_vit import EVA_RENAMES, EvaVisionTower
from models.weights import CheckpointReader, load_weights


@dataclass(frozen=True)
class ViTShape:
    family: str  # "clip" (transformers CLIPVisionModel) or "eva" (EVA-CLIP, post-norm)
    width: int
    depth: int
    heads: int
    mlp: int
    patch: int
    image_size: int
    tap_every: int = 1  # the published tap stride
    embed_dim: int = 0  # joint image-text embedding (the projection's output; 0: the width)


# Named shapes. The published ones match OpenAI CLIP and EVA02-CLIP-bigE-14; "demo" is the small CLIP-shaped
# model the CPU demo trains beside; "tiny", "eva-tiny" and "eva-small" are for tests.
SIZES: dict[str, ViTShape] = {
    "vit-b16": ViTShape("clip", 768, 12, 12, 3072, 16, 224, embed_dim=512),
    "vit-b32": ViTShape("clip", 768, 12, 12, 3072, 32, 224, embed_dim=512),
    "vit-l14": ViTShape("clip", 1024, 24, 16, 4096, 14, 224, embed_dim=768),
    "vit-e14": ViTShape("eva", 1792, 64, 16, 15360, 14, 224, tap_every=2, embed_dim=1024),
    "demo": ViTShape("clip", 128, 4, 4, 512, 16, 96, embed_dim=64),
    "tiny": ViTShape("clip", 32, 2, 2, 64, 8, 32, embed_dim=16),
    "eva-tiny": ViTShape("eva", 32, 2, 2, 64, 8, 32, tap_every=2),
    "eva-small": ViTShape(
        "eva", 512, 2, 8, 2048, 16, 64, tap_every=2
    ),  # tensors past DeepSpeed's 1 MiB swap floor
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """The frozen image model: its shape, its weights, and which of its blocks feed the side network."""

    name: str = "demo"
    """Named shape (see SIZES); a transformers CLIP directory in ``pretrained`` overrides a CLIP shape."""
    pretrained: str | None = None
    """Local weights: a transformers CLIP directory, or a .safetensors / .pt file (EVA-CLIP keys under
    ``visual.`` are accepted). Never downloads. None keeps random weights."""
    num_layers: int | None = None
    """Override the depth (depth-reduced variants for tests and benchmarks)."""
    tap_every: int = 0
    """Tap every k-th block: blocks k-1, 2k-1, ... (k=2: odd indices); 0: the published stride (ViT-E: 2)."""
    tap_layers: list[int] = field(default_factory=list)
    """Explicit block indices to tap (0-based); overrides ``tap_every`` when non-empty."""
    dtype: str = "float32"
    """Dtype of the frozen weights and of the activations handed over."""
    attn_implementation: str = "sdpa"
    """Attention kernel of transformers CLIP blocks: sdpa or eager."""
    forward_chunk: int = 0
    """Images per call of each block in the no-grad forward (0: the whole batch at once). A block's input
    and output stay whole; its transient (attention, the MLP's hidden tensors) exists for this many images."""

    def __post_init__(self):
        if self.name not in SIZES:
            raise ValueError(f"backbone.name: unknown size {self.name!r}; known: {sorted(SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.tap_every < 0:
            raise ValueError(f"backbone.tap_every must be >= 0, got {self.tap_every}")
        if self.forward_chunk < 0:
            raise ValueError(
                f"backbone.forward_chunk must be >= 0 (0: the whole batch), got {self.forward_chunk}"
            )
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"backbone.attn_implementation: {self.attn_implementation!r} is not sdpa or eager"
            )

    @property
    def shape(self) -> ViTShape:
        return SIZES[self.name]


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


class TapStream:
    """The iterator ``FrozenViT.forward`` returns: a plain object with attributes, unlike a bare generator,
    because module hooks (ZeRO-3's among them) inspect forward outputs through ``vars()``."""

    def __init__(self, taps: Iterator[torch.Tensor]):
        self.taps = taps

    def __iter__(self) -> TapStream:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self.taps)


class FrozenViT(nn.Module):
    """A frozen ViT with taps. Subclasses define ``embed``, ``blocks`` and ``run_block``."""

    blocks: nn.ModuleList

    def __init__(self, width: int, patch_size: int, image_size: int, taps: list[int]):
        super().__init__()
        self.width, self.patch_size, self.image_size = width, patch_size, image_size
        self.taps = list(taps)
        self.dtype = torch.get_default_dtype()  # built under default_dtype: the weights' dtype
        self.forward_chunk = 0  # images per block call in the no-grad forward (BackboneConfig.forward_chunk)

    def freeze(self) -> FrozenViT:
        self.requires_grad_(False)
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def train(self, mode: bool = True) -> FrozenViT:
        # Frozen: stays in eval mode whatever the caller asks (no dropout, fixed norms).
        return super().train(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_head(self) -> tuple[nn.LayerNorm, nn.Linear | None]:
        """The final norm and the projection into the joint image-text space (None if not built), which map
        the last block's class token to the image embedding."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)

    def chunked_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``run_block`` over ``forward_chunk`` images at a time (no grad): the output is written into one
        (B, 1 + N, width) tensor, so only one chunk's transient exists at once."""
        chunk = self.forward_chunk
        if chunk <= 0 or hidden.shape[0] <= chunk:
            return self.run_block(block, hidden)
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            out[start : start + chunk] = self.run_block(block, hidden[start : start + chunk])
        return out

    def attention_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What a block's attention part adds to the residual stream: ``block(x) = x' + mlp_branch(x')``
        with ``x' = x + attention_branch(x)``. Adapters (baselines) reuse the frozen parts through these."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """An iterator over the tapped blocks' outputs, in block order, each computed when asked for.

        Args:
            images: (B, 3, H, W) normalised pixels.
        Yields:
            (B, 1 + N, width) token states (class token first), without autograd history.
        """
        return TapStream(self._taps(images))

    @torch.no_grad()
    def _taps(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        hidden = self.embed(images)  # (B, 1 + N, width)
        tapped = set(self.taps)
        for index, block in enumerate(self.blocks[: self.taps[-1] + 1]):
            hidden = self.chunked_block(block, hidden)
            if index in tapped:
                yield hidden


class FrozenCLIPVision(FrozenViT):
    """transformers' CLIP vision tower (pre-norm blocks, ``pre_layrnorm`` after the embeddings)."""

    def __init__(self, vision: CLIPVisionModel, taps: list[int]):
        config: CLIPVisionConfig = vision.config
        super().__init__(config.hidden_size, config.patch_size, config.image_size, taps)
        tower = getattr(vision, "vision_model", vision)  # transformers 4.x keeps the tower one level down
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.blocks = tower.encoder.layers
        self.post_layernorm = tower.post_layernorm
        self.visual_projection = getattr(vision, "visual_projection", None)  # built for retrieval only
        self.freeze()

    def output_head(self) -> tuple[nn.LayerNorm, nn.Linear | None]:
        return self.post_layernorm, self.visual_projection

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(images.to(self.dtype)))

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, None)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple

    def attention_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block.self_attn(hidden_states=block.layer_norm1(hidden))[0]  # pre-norm

    def mlp_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block.mlp(block.layer_norm2(hidden))


class FrozenEVAVision(FrozenViT):
    """EVA-CLIP vision tower (EVA02-CLIP-bigE-14 shape for "vit-e14")."""

    def __init__(self, tower: EvaVisionTower, taps: list[int]):
        super().__init__(tower.width, tower.patch_size, tower.image_size, taps)
        self.embeddings = tower.embeddings
        self.blocks = tower.blocks
        self.norm = tower.norm
        self.head = tower.head
        self.freeze()

    def output_head(self) -> tuple[nn.LayerNorm, nn.Linear | None]:
        return self.norm, self.head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embeddings(images)

    def attention_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block.norm1(block.attn(hidden))  # post-norm

    def mlp_branch(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block.norm2(block.mlp(hidden))


def _clip_config(cfg: BackboneConfig) -> CLIPVisionConfig:
    if cfg.pretrained is not None and Path(cfg.pretrained).is_dir():
        config = CLIPVisionConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        # A whole CLIPModel keeps the projection size at its top level, outside the vision config.
        top = json.loads((Path(cfg.pretrained) / "config.json").read_text())
        config.projection_dim = top.get("projection_dim", config.projection_dim)
    else:
        s = cfg.shape
        config = CLIPVisionConfig(
            hidden_size=s.width,
            num_hidden_layers=s.depth,
            num_attention_heads=s.heads,
            intermediate_size=s.mlp,
            patch_size=s.patch,
            image_size=s.image_size,
            projection_dim=s.embed_dim or s.width,
        )
    if cfg.num_layers is not None:
        config.num_hidden_layers = cfg.num_layers
    config._attn_implementation = cfg.attn_implementation
    return config


def build_backbone(
    cfg: BackboneConfig,
    construct: Callable[[], AbstractContextManager] = nullcontext,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
    writer: bool = True,
    projection: bool = False,
    load: bool = True,
) -> FrozenViT:
    """Build the frozen backbone; load ``cfg.pretrained`` one piece (embeddings, a block, ...) at a time.

    Args:
        construct: context the modules are created in (e.g. a parameter-partitioning one for sharding).
        gather: context that makes a piece's parameters whole while they are written (sharded weights).
        writer: whether this process writes the weights (with sharding, one rank reads, the gather spreads).
        projection: also build (and load) a CLIP tower's projection into the joint space (retrieval).
        load: read the weights of ``cfg.pretrained`` (False: only its shape, from a CLIP directory's config).
    """
    shape = cfg.shape
    if cfg.pretrained is not None and not Path(cfg.pretrained).exists():
        raise FileNotFoundError(f"backbone.pretrained: {cfg.pretrained} does not exist")
    with default_dtype(DTYPES[cfg.dtype]), construct():
        if shape.family == "clip":
            config = _clip_config(cfg)
            taps = select_taps(config.num_hidden_layers, cfg.tap_every or shape.tap_every, cfg.tap_layers)
            vision = CLIPVisionModelWithProjection(config) if projection else CLIPVisionModel(config)
            model: FrozenViT = FrozenCLIPVision(vision, taps)
        else:
            depth = cfg.num_layers or shape.depth
            tower = EvaVisionTower(
                shape.width,
                depth,
                shape.heads,
                shape.mlp,
                shape.patch,
                shape.image_size,
                shape.embed_dim or shape.width,
            )
            taps = select_taps(depth, cfg.tap_every or shape.tap_every, cfg.tap_layers)
            model = FrozenEVAVision(tower, taps)
    model.forward_chunk = cfg.forward_chunk
    if cfg.pretrained is not None and load:
        reader = CheckpointReader(cfg.pretrained)
        prefixes = ("vision_model.", "") if shape.family == "clip" else ("visual.", "")
        rename = _clip_rename if shape.family == "clip" else (lambda name: EVA_RENAMES.get(name, name))
        load_weights(model, reader, prefixes, gather=gather, writer=writer, rename=rename)
    return model


def meta_backbone(cfg: BackboneConfig) -> FrozenViT:
    """The backbone on the meta device (nothing allocated, no weights read), for sizes and memory plans. Its
    shape is what ``build_backbone`` would build: a transformers CLIP directory at ``cfg.pretrained`` gives
    it when the directory exists; otherwise the named shape (so a plan can be made before the download)."""
    directory = cfg.pretrained is not None and Path(cfg.pretrained).is_dir()
    with torch.device("meta"):
        return build_backbone(replace(cfg, pretrained=cfg.pretrained if directory else None), load=False)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in ``dtype`` (no full-precision copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _clip_rename(name: str) -> str:
    """Our CLIP wrapper's parameter names -> transformers' names inside the vision tower."""
    return name.replace("blocks.", "encoder.layers.", 1) if name.startswith("blocks.") else name
