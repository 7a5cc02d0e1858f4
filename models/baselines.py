"""Other ways to transfer the same frozen image ViT to video, for the memory benchmark (launch.bench_memory).

Every method wraps a ``FrozenViT`` and maps (B, T, 3, H, W) normalised frames to (B, classes) logits:

- ``frozen``: the backbone's forward alone, no training (the inference-only reference).
- ``linear_probe``: the frozen final class token -> the frozen final norm -> mean over time -> Linear.
- ``full_finetune``: the same, with every backbone weight trained.
- ``st_adapter``: a bottleneck adapter with a depthwise 3D conv before each block (Pan et al., 2022).
- ``aim``: per block, a temporal adapter on the frozen attention run along time, a spatial adapter after the
  spatial attention and an adapter parallel to the MLP (Yang et al., 2023).
- ``evl``: the frozen last blocks' tokens -> a small transformer decoder with one learnable query
  (Lin et al., 2022).
- ``side4video``: the side network (models/side4video.py) beside the frozen taps.

Adapter methods backpropagate through the frozen blocks, as in their papers; ``evl`` and ``side4video`` never
do (their inputs arrive without autograd history).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import FrozenViT
from models.side4video import Side4Video

METHODS = ("frozen", "linear_probe", "full_finetune", "st_adapter", "aim", "evl", "side4video")


def _zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class TemporalMeanHead(nn.Module):
    """Per-frame class tokens (B*T, W) -> mean over time -> Linear. The norm is the backbone's own."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, cls: torch.Tensor, frames: int) -> torch.Tensor:
        return self.fc(cls.unflatten(0, (-1, frames)).mean(dim=1))  # (B, classes)


class FrozenOnly(nn.Module):
    """Inference-only reference: every block of the frozen backbone, nothing trained."""

    def __init__(self, backbone: FrozenViT):
        super().__init__()
        self.backbone = backbone

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        *_, last = self.backbone(frames.flatten(0, 1))  # (B*T, 1 + N, W)
        return last[:, 0]


class LinearProbe(nn.Module):
    def __init__(self, backbone: FrozenViT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = TemporalMeanHead(backbone.width, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            *_, last = self.backbone(frames.flatten(0, 1))
            cls = self.backbone.output_head()[0](last[:, 0])  # (B*T, W)
        return self.head(cls.to(self.head.fc.weight.dtype), frames.shape[1])


class FullFinetune(nn.Module):
    """The backbone with every weight trained (the frozen wrapper unfrozen), and a temporal-mean head."""

    def __init__(self, backbone: FrozenViT, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        projection = backbone.output_head()[1]
        if projection is not None:  # the image-text projection is not used for recognition
            projection.requires_grad_(False)
        self.head = TemporalMeanHead(backbone.width, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embed(frames.flatten(0, 1))  # (B*T, 1 + N, W)
        for block in self.backbone.blocks:
            hidden = self.backbone.run_block(block, hidden)
        return self.head(self.backbone.output_head()[0](hidden[:, 0]), frames.shape[1])


class Adapter(nn.Module):
    """Linear down -> GELU -> Linear up (zero-initialised, so a new adapter adds nothing)."""

    def __init__(self, width: int, bottleneck: int, skip: bool):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = _zero_init(nn.Linear(bottleneck, width))
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(F.gelu(self.down(x)))
        return x + y if self.skip else y


class STAdapter(nn.Module):
    """Down-projection, depthwise 3D conv over (time, height, width), up-projection; class token untouched."""

    def __init__(self, width: int, bottleneck: int, grid: int, kernel: int = 3):
        super().__init__()
        self.grid = grid
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv3d(
            bottleneck, bottleneck, (kernel, 3, 3), padding=(kernel // 2, 1, 1), groups=bottleneck
        )
        self.up = _zero_init(nn.Linear(bottleneck, width))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """(B*T, 1 + N, W) -> the same, patches updated."""
        patches = self.down(x[:, 1:]).unflatten(0, (-1, frames))  # (B, T, N, r)
        batch, width = patches.shape[0], patches.shape[-1]
        vol = patches.permute(0, 3, 1, 2).reshape(batch, width, frames, self.grid, self.grid)
        vol = self.conv(vol).flatten(3).permute(0, 2, 3, 1).flatten(0, 1)  # (B*T, N, r)
        return torch.cat([x[:, :1], x[:, 1:] + self.up(vol)], dim=1)


class STAdapterNet(nn.Module):
    def __init__(self, backbone: FrozenViT, num_classes: int, ratio: float = 0.5):
        super().__init__()
        self.backbone = backbone
        width = backbone.width
        self.adapters = nn.ModuleList(
            STAdapter(width, int(width * ratio), backbone.grid) for _ in range(backbone.num_layers)
        )
        self.head = TemporalMeanHead(width, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        bb, time = self.backbone, frames.shape[1]
        hidden = bb.embed(frames.flatten(0, 1))  # (B*T, 1 + N, W); no grad needed below the first adapter
        for block, adapter in zip(bb.blocks, self.adapters, strict=True):
            hidden = bb.run_block(block, adapter(hidden, time))
        return self.head(bb.output_head()[0](hidden[:, 0]), time)


class AIMNet(nn.Module):
    """AIM: the frozen attention is reused along time (a temporal adapter on its output), then run as usual
    (a spatial adapter on its output), and an adapter runs beside the MLP with scale 0.5."""

    def __init__(self, backbone: FrozenViT, num_classes: int, ratio: float = 0.25, mlp_scale: float = 0.5):
        super().__init__()
        self.backbone = backbone
        width, bottleneck = backbone.width, int(backbone.width * ratio)
        depth = backbone.num_layers
        self.temporal = nn.ModuleList(Adapter(width, bottleneck, skip=False) for _ in range(depth))
        self.spatial = nn.ModuleList(Adapter(width, bottleneck, skip=True) for _ in range(depth))
        self.parallel = nn.ModuleList(Adapter(width, bottleneck, skip=False) for _ in range(depth))
        self.mlp_scale = mlp_scale
        self.head = TemporalMeanHead(width, num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        bb, time = self.backbone, frames.shape[1]
        hidden = bb.embed(frames.flatten(0, 1))  # (B*T, L, W)
        length = hidden.shape[1]
        for i, block in enumerate(bb.blocks):
            along_time = hidden.unflatten(0, (-1, time)).transpose(1, 2).flatten(0, 1)  # (B*L, T, W)
            update = self.temporal[i](bb.attention_branch(block, along_time))
            hidden = hidden + update.unflatten(0, (-1, length)).transpose(1, 2).flatten(0, 1)
            hidden = hidden + self.spatial[i](bb.attention_branch(block, hidden))
            hidden = hidden + bb.mlp_branch(block, hidden) + self.mlp_scale * self.parallel[i](hidden)
        return self.head(bb.output_head()[0](hidden[:, 0]), time)


class DecoderLayer(nn.Module):
    """Query cross-attends to one level's tokens, then an MLP; pre-norm."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = (
            nn.LayerNorm(width),
            nn.LayerNorm(width),
            nn.LayerNorm(width),
        )
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(tokens)
        query = query + self.attn(self.norm_q(query), kv, kv, need_weights=False)[0]
        return query + self.mlp(self.norm_mlp(query))


class EVLNet(nn.Module):
    """EVL: the frozen taps (the last blocks) -> a local temporal conv per level -> one decoder layer per
    level, updating one learnable query -> LayerNorm -> Linear."""

    def __init__(self, backbone: FrozenViT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        width, levels = backbone.width, len(backbone.taps)
        heads = max(1, width // 64)
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.temporal = nn.ModuleList(
            nn.Conv1d(width, width, 3, padding=1, groups=width) for _ in range(levels)
        )
        self.decoder = nn.ModuleList(DecoderLayer(width, heads) for _ in range(levels))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, time = frames.shape[:2]
        query = self.query.expand(batch, -1, -1)
        dtype = self.query.dtype
        for tap, conv, layer in zip(
            self.backbone(frames.flatten(0, 1)), self.temporal, self.decoder, strict=True
        ):
            tokens = tap.to(dtype).unflatten(0, (batch, time))  # (B, T, L, W), no autograd history
            length, width = tokens.shape[2:]
            along_time = tokens.permute(0, 2, 3, 1).reshape(batch * length, width, time)  # (B*L, W, T)
            local = conv(along_time).view(batch, length, width, time).permute(0, 3, 1, 2)
            query = layer(query, (tokens + local).flatten(1, 2))  # keys: (B, T*L, W)
        return self.fc(self.norm(query[:, 0]))


class SideRecognizer(nn.Module):
    """Side4Video beside its frozen backbone, as the trainer runs it (``Side4Video.forward_features``: in
    training the frozen forward ends before the side network starts)."""

    def __init__(self, backbone: FrozenViT, side: Side4Video):
        super().__init__()
        self.backbone, self.side = backbone, side

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.side(frames, self.backbone(frames.flatten(0, 1)))
