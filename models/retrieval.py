"""Side4Video for text-video retrieval: the side network's tokens correct the frozen CLIP's frame embeddings.

Video: side tokens -> the side network's BatchNorm -> mean over space per frame -> Linear(d -> width) without
bias, initialised to zero, added to the frozen final-layer class token of each frame -> the frozen final norm
and projection -> one embedding per frame. At step 0 the frame embeddings are exactly the frozen CLIP's.
As released (RELEASES.md section 2), the side network's position embedding covers 1 + N tokens: a class row
beside its N patch rows, added to the shifted class token that joins each side block's attention context.

Matching (``SideConfig.matching``):
- "wti": weighted token-wise interaction. Text token i takes its best frame, frame j its best text token;
  each direction is a weighted mean, weights a softmax over a small MLP's scores (zero for padded tokens);
  the two averaged. As released, a padded token's similarity is 0 in a frame's max over tokens (``pad_tokens:
  zero``); ``exclude`` keeps padded tokens out of that max altogether.
- "mean": cosine of the mean frame embedding and the text's end-token embedding (CLIP's sentence vector).
Logits are the similarities times a learnable scale exp(s), clamped at 100.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.side4video import Side4Video, SideConfig

MAX_LOGIT_SCALE = 100.0
PAD_TOKENS = ("zero", "exclude")


class FrozenOutputHead(nn.Module):
    """A frozen copy of the backbone's final norm and projection: gradients pass through, weights stay."""

    def __init__(self, width: int, embed_dim: int, eps: float, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=bias)
        self.requires_grad_(False)

    @torch.no_grad()
    def copy_from(self, norm: nn.LayerNorm, proj: nn.Linear) -> None:
        for mine, theirs in zip(self.parameters(), [*norm.parameters(), *proj.parameters()], strict=True):
            mine.copy_(theirs.to(mine.dtype))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """(..., width) class tokens -> (..., E) embeddings."""
        return self.proj(self.norm(cls))


class TokenWeights(nn.Module):
    """A token's weight logit from its embedding: Linear -> ReLU -> Linear(1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (...,)"""
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1)


class Side4VideoRetrieval(nn.Module):
    """Side network + retrieval head + matching.

    Args:
        cfg: side network shape and matching.
        backbone_width, patch_size, grid, depth: as for ``Side4Video``.
        embed_dim: joint embedding size E (the frozen projection's output).
        norm_eps, proj_bias: the frozen final norm's epsilon and whether the projection has a bias.
        pad_tokens: "zero" (a padded text token's similarity counts as 0 in each frame's best-token max, as
            released) or "exclude" (padded tokens never take part in it).
    """

    def __init__(
        self,
        cfg: SideConfig,
        backbone_width: int,
        patch_size: int,
        grid: int,
        depth: int,
        embed_dim: int,
        norm_eps: float,
        proj_bias: bool,
        pad_tokens: str = "zero",
    ):
        super().__init__()
        if pad_tokens not in PAD_TOKENS:
            raise ValueError(f"pad_tokens must be one of {PAD_TOKENS}, got {pad_tokens!r}")
        self.matching, self.pad_tokens = cfg.matching, pad_tokens
        self.side = Side4Video(cfg, backbone_width, patch_size, grid, depth, classifier=False)
        # The class-token row of the 1 + N position embedding (the side network holds the N patch rows): one
        # shared row, or one per block with side.pos_embed=per_block; initialised as the patch rows.
        rows = depth if cfg.pos_embed == "per_block" else 1
        self.class_pos_embed = nn.Parameter(torch.zeros(rows, cfg.width))
        nn.init.normal_(self.class_pos_embed, std=0.02 if self.side.block == "eva" else 0.01)
        for index, block in enumerate(self.side.blocks):
            # The block builds its attention context [shifted class token, patches + pos] itself.
            block.attn.register_forward_pre_hook(partial(self._add_class_position, index % rows))
        self.to_class = nn.Linear(cfg.width, backbone_width, bias=False)
        nn.init.zeros_(self.to_class.weight)
        self.output = FrozenOutputHead(backbone_width, embed_dim, norm_eps, proj_bias)
        self.video_weights = TokenWeights(embed_dim)
        self.text_weights = TokenWeights(embed_dim)
        # shape (1,), not a scalar (DeepSpeed broadcasts parameters as bytes)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale)))

    def _add_class_position(self, row: int, attention: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of a side block's attention: adds the class row to the context's class token."""
        context, *rest = args  # (B, T, 1 + N, d)
        cls = context[:, :, :1] + self.class_pos_embed[row].to(context.dtype)
        return (torch.cat([cls, context[:, :, 1:]], dim=2), *rest)

    def encode_video(self, frames: torch.Tensor, taps: Iterable[torch.Tensor]) -> torch.Tensor:
        """(B, T, 3, H, W) frames + taps (the last one the backbone's final block) -> (B, T, E) frames."""
        last: list[torch.Tensor] = []

        def remember_last(stream: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
            for tap in stream:
                last[:] = [tap]
                yield tap

        batch, num_frames = frames.shape[:2]
        tokens = self.side.norm(self.side.forward_features(frames, remember_last(taps)))  # (B, T, N, d)
        correction = self.to_class(tokens.mean(2))  # (B, T, W)
        cls = last[0][:, 0].unflatten(0, (batch, num_frames))  # (B, T, W) frozen final class tokens
        return self.output(cls.to(correction.dtype) + correction)

    def forward(
        self,
        frames: torch.Tensor,
        taps: Iterable[torch.Tensor],
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Frame embeddings (B, T, E); with ``text`` (B, L, E) and ``text_mask`` (B, L), the text-to-video
        logits (B', B') over the batch as ``gather`` assembles it (e.g. from all ranks; default: as is)."""
        video = self.encode_video(frames, taps)
        if text is None:
            return video
        gather = gather or (lambda x: x)
        return self.logits(gather(video), gather(text.to(video.dtype)), gather(text_mask))

    def logits(self, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Scaled similarities (Bt, Bv): video (Bv, T, E), text (Bt, L, E), text_mask (Bt, L)."""
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return scale * self.similarity(video, text, text_mask)

    def similarity(self, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text-to-video similarity (Bt, Bv) in [-1, 1]."""
        valid = text_mask.bool()
        if self.matching == "mean":
            frames = F.normalize(F.normalize(video, dim=-1).mean(1), dim=-1)  # (Bv, E)
            last = valid.sum(1) - 1  # the end token: the last valid one
            sentence = F.normalize(text[torch.arange(text.shape[0]), last], dim=-1)  # (Bt, E)
            return sentence @ frames.T
        text_w = self.text_weights(text).float().masked_fill(~valid, float("-inf")).softmax(-1)  # (Bt, L)
        video_w = self.video_weights(video).float().softmax(-1)  # (Bv, T)
        text, video = F.normalize(text, dim=-1), F.normalize(video, dim=-1)
        sim = torch.einsum("ale,bfe->ablf", text, video).float()  # (Bt, Bv, L, T)
        text_to_video = (sim.amax(3) * text_w[:, None]).sum(2)  # each token's best frame
        pad = ~valid[:, None, :, None]
        if self.pad_tokens == "zero":
            best_token = sim.masked_fill(pad, 0.0).amax(2)  # (Bt, Bv, T)
        else:
            best_token = sim.masked_fill(pad, float("-inf")).amax(2)
        video_to_text = (best_token * video_w[None]).sum(2)  # each frame's best token
        return (text_to_video + video_to_text) / 2


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) text-to-video logit matrix whose diagonal holds the pairs."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
