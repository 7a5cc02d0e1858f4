"""EVA-CLIP vision tower with post-norm blocks (EVA02-CLIP-bigE-14, "ViT-E", about 4.4B parameters).

Parameter names follow the EVA-CLIP checkpoints' ``visual.*`` keys (``blocks.{i}.attn.qkv.weight``,
``attn.q_bias``, ``attn.v_bias``, ...), so a checkpoint maps onto this module by dropping the prefix.
The class token and position embedding sit inside ``embeddings`` so that every parameter is used only by the
forward of the module that owns it (ZeRO-3 gathers weights per module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, W)


class EvaEmbeddings(nn.Module):
    def __init__(self, width: int, patch: int, image_size: int):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images.to(self.cls_token.dtype))  # (B, N, W)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed  # (B, 1 + N, W)


class EvaAttention(nn.Module):
    """Multi-head self-attention; the qkv projection has biases for q and v only, as in EVA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        # self.qkv(x), not F.linear(x, self.qkv.weight): under ZeRO-3 a weight read outside its own
        # module's forward is an empty placeholder.
        qkv = (self.qkv(x) + bias).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    """Post-norm residual block: the norm is applied to each branch's output before the residual add."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = EvaMlp(width, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class EvaVisionTower(nn.Module):
    """Embeddings, ``depth`` post-norm blocks, final norm and the projection head (unused for recognition).

    Args:
        width, depth, heads, mlp: block shape (ViT-E: 1792, 64, 16 heads of 112, 15360).
        patch, image_size: 14 and 224 for ViT-E.
        embed_dim: output of the projection head (1024 for EVA02-CLIP-bigE-14).
    """

    def __init__(
        self, width: int, depth: int, heads: int, mlp: int, patch: int, image_size: int, embed_dim: int
    ):
        super().__init__()
        self.width, self.patch_size, self.image_size = width, patch, image_size
        self.embeddings = EvaEmbeddings(width, patch, image_size)
        self.blocks = nn.ModuleList(EvaBlock(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, embed_dim)


# EVA-CLIP checkpoints keep the class token and position embedding at the top of the tower.
EVA_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.pos_embed": "pos_embed",
    "embeddings.patch_embed.proj.weight": "patch_embed.proj.weight",
    "embeddings.patch_embed.proj.bias": "patch_embed.proj.bias",
}
