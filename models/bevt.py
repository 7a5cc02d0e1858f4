"""BEVT: masked image and masked video modelling with one shared Video Swin encoder.

Each stream masks patches (the mask token replaces them), encodes, decodes stages 3 and 4 back to the stage-3
grid (one cell per target token) and predicts the tokenizer's code there through one shared head; the loss is
cross-entropy on masked cells only. Per stream decoder (REFERENCE section 2):

    stage 4 (B, T', h/2, w/2, C4) --ConvTranspose x2 in space--> (B, T', h, w, C4)
    concat stage 3 (B, T', h, w, C3) --Linear(C3 + C4 -> D)--> (B, T', h, w, D)
    video only: ConvTranspose x(patch_t) in time --> (B, T, h, w, D)
    LayerNorm --> shared head Linear(D -> vocabulary)

Norms (``bevt.norms``), "released" as BEVT's release (RELEASES.md section 4): the encoder's stages 3 and 4
reach the decoders raw and the LayerNorm before the head is one module shared by both streams
(``decoder_norm``; with D equal to stage 4's width, as released, it initialises the encoder's final norm at
fine-tuning); each stream has its own patch-embedding norm. "encoder", the project's earlier layout: the
encoder norms stages 3 and 4, each decoder has its own LayerNorm, one patch-embedding norm for both streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from data.masking import MaskConfig
from models.swin3d import NORMS, VideoSwin
from models.tokenizers import TokenizerConfig

STREAMS = ("image", "video")
STAGES = {"image": ("image",), "joint": ("image", "video")}


@dataclass
class BEVTConfig:
    """BEVT pretraining (``task: bevt``): streams, decoders, masking and the frozen target tokenizer."""

    stage: str = "joint"
    """"image": stage 1, the image stream alone; "joint": stage 2, one video and one image batch per step."""
    image_weight: float = 1.0
    """lambda in L = L_video + lambda * L_image."""
    decoder_dim: int = 1024
    """Width of each stream's decoder (the stage 3 + upsampled stage 4 features are projected to it); as
    released, stage 4's width (1024 at Swin-B), so the shared decoder norm can initialise the final norm."""
    norms: str = "released"
    """released (BEVT's release: per-stream patch-embedding norms, raw stages 3-4 into the decoders, one
    LayerNorm shared by both decoders) or encoder (the project's earlier layout, see models/bevt.py)."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"bevt.stage: {self.stage!r} is not one of {sorted(STAGES)}")
        if self.norms not in NORMS:
            raise ValueError(f"bevt.norms: {self.norms!r} is not one of {NORMS}")
        if self.image_weight < 0 or self.decoder_dim < 1:
            raise ValueError("bevt.image_weight must be >= 0 and bevt.decoder_dim >= 1")

    @property
    def streams(self) -> tuple[str, ...]:
        return STAGES[self.stage]


class Decoder(nn.Module):
    """One stream's decoder; ``norm``: its own LayerNorm at the end (the earlier layout; released: none)."""

    def __init__(self, dims: list[int], width: int, temporal: int = 1, norm: bool = False):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(dims[-1], dims[-1], 2, 2)
        self.fuse = nn.Linear(dims[-2] + dims[-1], width)
        self.temporal = (
            nn.ConvTranspose3d(width, width, (temporal, 1, 1), (temporal, 1, 1)) if temporal > 1 else None
        )
        self.norm = nn.LayerNorm(width) if norm else None

    def forward(self, stage3: torch.Tensor, stage4: torch.Tensor) -> torch.Tensor:
        """stage3 (B, T', h, w, C3), stage4 (B, T', h/2, w/2, C4) -> (B, T' * temporal, h, w, D)."""
        b, t, h2, w2, c4 = stage4.shape
        up = self.upsample(stage4.reshape(b * t, h2, w2, c4).permute(0, 3, 1, 2))  # (B T', C4, h, w)
        up = up.permute(0, 2, 3, 1).reshape(b, t, 2 * h2, 2 * w2, c4)
        x = self.fuse(torch.cat([stage3, up], -1))  # (B, T', h, w, D)
        if self.temporal is not None:
            x = self.temporal(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # (B, T, h, w, D)
        return x if self.norm is None else self.norm(x)


class BEVT(nn.Module):
    """The encoder, one decoder per stream, the decoders' shared norm (released norms) and the shared
    prediction head. The norm layout is the encoder's (``encoder.norms``)."""

    def __init__(self, encoder: VideoSwin, vocab_size: int, decoder_dim: int):
        super().__init__()
        if encoder.norms == "released" and encoder.norm is not None:
            raise ValueError(
                "BEVT with released norms reads stage 4 raw: build the encoder with final_norm=False"
            )
        self.encoder = encoder
        own_norms = encoder.norms == "encoder"
        self.decoders = nn.ModuleDict(
            {
                "image": Decoder(encoder.dims, decoder_dim, norm=own_norms),
                "video": Decoder(encoder.dims, decoder_dim, encoder.shape.patch[0], norm=own_norms),
            }
        )
        self.decoder_norm = None if own_norms else nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, vocab_size)
        for module in (self.decoders, self.head):
            module.apply(_init_linear)

    @property
    def cell(self) -> int:
        """Patch tokens per target cell along a side (the stage-3 stride over the patch size)."""
        return self.encoder.stride // self.encoder.shape.patch[1]

    def stream(self, name: str, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> dict:
        """One stream's loss and masked accuracy.

        Args:
            x: (B, 3, H, W) images or (B, 3, T, H, W) video, normalised.
            mask: bool, (B, g, g) for images, (B, T', g, g) for video (g = H / stride); True = masked.
            targets: int64 codes, (B, g, g) or (B, T, g, g) (one grid per frame).
        Returns:
            {"loss": scalar, "correct": masked cells predicted right, "masked": masked cells} (last two
            detached counts, summable across batches and ranks).
        """
        cell = self.cell
        patch_mask = mask.repeat_interleave(cell, -1).repeat_interleave(cell, -2)  # patch resolution
        *_, stage3, stage4 = self.encoder(x, patch_mask)
        decoded = self.decoders[name](stage3, stage4)  # (B, T or 1, g, g, D)
        if self.decoder_norm is not None:
            decoded = self.decoder_norm(decoded)
        if name == "video":
            mask = mask.repeat_interleave(self.encoder.shape.patch[0], 1)  # (B, T, g, g): slots -> frames
        else:
            decoded = decoded[:, 0]  # (B, g, g, D): one slot
        if decoded.shape[:-1] != targets.shape or targets.shape != mask.shape:
            raise ValueError(
                f"{name} stream: predictions {tuple(decoded.shape[:-1])}, targets {tuple(targets.shape)} "
                f"and mask {tuple(mask.shape)} must cover the same grid"
            )
        logits = self.head(decoded[mask])  # (M, V): masked cells only
        chosen = targets[mask]
        loss = F.cross_entropy(logits.float(), chosen)
        correct = (logits.argmax(-1) == chosen).sum().detach()
        return {"loss": loss, "correct": correct, "masked": torch.tensor(chosen.numel(), device=x.device)}

    def forward(
        self, batches: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weights: dict[str, float]
    ):
        """``batches``: stream -> (inputs, mask, targets); returns the weighted loss, per-stream results."""
        results = {name: self.stream(name, *batch) for name, batch in batches.items()}
        loss = sum(weights[name] * result["loss"] for name, result in results.items())
        return loss, results


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
