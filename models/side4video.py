"""Side4Video: a spatial-temporal side network beside a frozen image ViT (arXiv 2311.15769).

The side stream keeps patch tokens only, laid out channels-last as (B, T, N, d). At every tapped backbone
block it fuses that block's output (0.5 side + 0.5 projected backbone patches) and runs one side block:
temporal depthwise conv, spatial attention whose keys include the time-shifted class token, and an MLP.
No gradient reaches the backbone: its taps arrive without autograd history.

Two side blocks, as released (RELEASES.md section 1), with the same parameters in a different order:
- "clip" (B/16, L/14): pre-norm. Tap: LayerNorm(W) -> Linear(W -> d). Each part normalises its input:
  BatchNorm before the temporal conv and the MLP, LayerNorm before the attention. BatchNorm before pooling.
- "eva" (E/14): post-norm. Tap: Linear(W -> d) -> LayerNorm(d). Each part's output is normalised before the
  residual add (BN_1 after the temporal conv, LN_1 after the attention, BN_2 after the MLP). No norm before
  pooling.
The spatial position embedding is one (N, d) tensor added in every block (``pos_embed: shared``, as
released) or one per block (``per_block``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.lean import (
    TokenBatchNorm,
    checkpoint_contexts,
    chunked_mlp,
    lean_applies,
    linear_norm,
    norm_linear,
    norm_project,
    project_norm,
    recomputing,
)
from models.weights import fit_problems

BLOCKS = ("clip", "eva", "auto")
POS_EMBEDS = ("shared", "per_block")


@dataclass
class SideConfig:
    """Shape of the side network; depth equals the number of backbone taps."""

    width: int = 128
    """Side width d (published: 320 for B/16, 512 for L/14, 576 for E/14)."""
    heads: int = 0
    """Attention heads; 0 means width // 64 as published."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of d."""
    temporal_kernel: int = 3
    """Kernel size of the depthwise temporal conv and of the stem's time axis."""
    num_classes: int = 8
    """Classifier outputs (recognition)."""
    block: str = "auto"
    """Side block: "clip" (pre-norm, the B/16 and L/14 release), "eva" (post-norm, the E/14 release) or
    "auto" ("eva" beside an EVA backbone such as vit-e14, eva-tiny, eva-small; "clip" otherwise)."""
    pos_embed: str = "shared"
    """Spatial position embedding: "shared" (one (N, d) tensor added in every side block, as released) or
    "per_block" (one per side block)."""
    init_from: str | None = None
    """Side network and classifier weights to start from: a ``side.safetensors`` written by
    ``python -m launch.convert_checkpoint --side4video`` (or the directory holding it). None: fresh."""
    matching: str = "wti"
    """Retrieval matching: "wti" (weighted token-wise max similarity, both directions) or "mean" (mean
    frame embedding against the text's end token)."""
    logit_scale: float = 100.0
    """Retrieval: the initial logit scale (learnable, clamped at 100). 100 is where a trained CLIP's scale
    ends (CLIP clamps it there); 1 / 0.07 is CLIP's own initialisation for training from scratch."""
    attention: str = "sdpa"
    """Side attention kernel: "sdpa" (PyTorch's fused scaled_dot_product_attention, which keeps no attention
    matrix for backward) or "eager" (softmax(q k^T) v, kept for measurement)."""
    checkpoint: bool = False
    """Activation checkpointing of the side blocks: keep each block's input and tap, recompute the rest in
    the backward pass (saved activations drop several-fold for about a third more side compute). The last
    block is never recomputed: its backward follows its forward at once."""
    mlp_chunk: int = 1024
    """Tokens per chunk of the side MLP's GELU, second GEMM and hidden-width gradients: only the MLP's input
    and pre-activation are kept for backward, and no full (tokens, 4d) GELU output or gradient is formed.
    0: plain autograd (keeps the GELU output too and forms full-size gradients)."""
    recompute_norms: bool = True
    """Norms beside linear layers keep less for backward. Pre-norm ("clip" block): each norm that feeds a
    linear layer keeps only its input and statistics and recomputes its output there, instead of both it and
    the linear layer keeping a copy. Post-norm ("eva" block): each norm that follows a linear layer (the tap
    projection, the temporal conv's last pointwise conv, the attention's output projection, and the MLP's
    second layer when ``mlp_chunk`` is 0) keeps only its statistics; its input is recomputed by that layer's
    GEMM in backward."""

    def __post_init__(self):
        if self.width < 1 or self.num_classes < 1:
            raise ValueError("side.width and side.num_classes must be positive")
        if self.num_heads < 1 or self.width % self.num_heads:
            raise ValueError(f"side.heads={self.num_heads} must divide side.width={self.width}")
        if self.block not in BLOCKS:
            raise ValueError(f"side.block must be one of {BLOCKS}, got {self.block!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"side.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.matching not in ("wti", "mean"):
            raise ValueError(f"side.matching must be 'wti' or 'mean', got {self.matching!r}")
        if not 0 < self.logit_scale <= 100:
            raise ValueError(f"side.logit_scale must be in (0, 100], got {self.logit_scale}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"side.attention must be 'sdpa' or 'eager', got {self.attention!r}")
        if self.mlp_chunk < 0:
            raise ValueError(f"side.mlp_chunk must be >= 0 (0: plain autograd), got {self.mlp_chunk}")
        if self.temporal_kernel % 2 == 0:
            raise ValueError(f"side.temporal_kernel must be odd, got {self.temporal_kernel}")

    @property
    def num_heads(self) -> int:
        return self.heads or max(1, self.width // 64)

    def block_for(self, family: str) -> str:
        """The side block beside a backbone of ``family`` ("clip" or "eva"): ``block``, "auto" resolved."""
        if self.block != "auto":
            return self.block
        return "eva" if family == "eva" else "clip"


def shift_class_token(cls: torch.Tensor) -> torch.Tensor:
    """Half the channels from frame t+1, half from t-1, zeros past the ends. (B, T, d) -> (B, T, d)."""
    batch, _, width = cls.shape
    half = width // 2
    zeros_fwd = cls.new_zeros(batch, 1, half)
    zeros_bwd = cls.new_zeros(batch, 1, width - half)
    from_next = torch.cat([cls[:, 1:, :half], zeros_fwd], dim=1)
    from_prev = torch.cat([zeros_bwd, cls[:, :-1, half:]], dim=1)
    return torch.cat([from_next, from_prev], dim=-1)


class TapFusion(nn.Module):
    """A backbone block's tokens into side width: LayerNorm(W) + Linear(W -> d), or with ``post_norm``
    Linear(W -> d) + LayerNorm(d) (the E/14 release)."""

    def __init__(
        self, backbone_width: int, width: int, post_norm: bool = False, recompute_norm: bool = False
    ):
        super().__init__()
        self.post_norm, self.recompute_norm = post_norm, recompute_norm
        self.norm = nn.LayerNorm(width if post_norm else backbone_width)
        self.proj = nn.Linear(backbone_width, width)

    def forward(self, tokens: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*T, 1 + N, W) -> class (B, T, d), patches (B, T, N, d)."""
        norm, proj = self.norm, self.proj
        if tokens.requires_grad:  # not a frozen tap: plain autograd
            projected = norm(proj(tokens)) if self.post_norm else proj(norm(tokens))
        elif self.post_norm:
            projected = project_norm(tokens, proj, norm, self.recompute_norm)
        else:
            projected = norm_project(tokens, norm, proj)
        projected = projected.unflatten(0, (-1, frames))  # (B, T, 1 + N, d)
        return projected[:, :, 0], projected[:, :, 1:]


class TemporalConv(nn.Module):
    """Pointwise, depthwise conv over time, pointwise; the norm before them, or after them (``post_norm``)."""

    def __init__(self, width: int, kernel: int, recompute_norm: bool = False, post_norm: bool = False):
        super().__init__()
        self.norm = TokenBatchNorm(width)
        self.pw_in = nn.Linear(width, width)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.pw_out = nn.Linear(width, width)
        self.recompute_norm, self.post_norm = recompute_norm, post_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, width = x.shape
        if self.post_norm:
            y = self.pw_in(x)
        else:
            y = norm_linear(self.norm, self.pw_in, x, self.recompute_norm)
        y = y.permute(0, 2, 3, 1).reshape(batch * tokens, width, frames)  # (B*N, d, T)
        y = self.depthwise(y)
        y = y.view(batch, tokens, width, frames).permute(0, 3, 1, 2)  # (B, T, N, d)
        if self.post_norm:
            return linear_norm(self.pw_out, self.norm, y, self.recompute_norm)
        return self.pw_out(y)


class SpatialAttention(nn.Module):
    """Attention within each frame: patch-token queries; keys/values also see the shifted class token."""

    def __init__(self, width: int, heads: int, fused: bool = True, recompute_norm: bool = False):
        super().__init__()
        self.heads, self.fused, self.recompute_norm = heads, fused, recompute_norm
        self.in_proj = nn.Linear(width, 3 * width)  # q, k, v stacked
        self.out_proj = nn.Linear(width, width)

    def forward(self, context: torch.Tensor, norm: nn.LayerNorm, post_norm: bool = False) -> torch.Tensor:
        """(B, T, 1 + N, d) [class, patches] -> (B, T, N, d) update for the patches. ``norm`` is applied to
        the context (pre-norm) or, with ``post_norm``, to the output projection's result."""
        batch, frames, length, width = context.shape
        if post_norm:
            qkv = self.in_proj(context)
        else:
            qkv = norm_linear(norm, self.in_proj, context, self.recompute_norm)
        qkv = qkv.view(batch * frames, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B*T, heads, 1 + N, head_dim)
        if self.fused:
            out = F.scaled_dot_product_attention(q[:, :, 1:], k, v)  # (B*T, heads, N, head_dim)
        else:
            weights = (q[:, :, 1:] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B*T, heads, N, 1 + N)
            out = weights.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, frames, length - 1, width)
        if post_norm:
            return linear_norm(self.out_proj, norm, out, self.recompute_norm)
        return self.out_proj(out)


class Mlp(nn.Module):
    """Norm, Linear, GELU, Linear; or with ``post_norm`` Linear, GELU, Linear, norm. ``chunk`` > 0: the
    MLP's GELU, second GEMM and hidden-width gradients run over that many tokens at a time, keeping only the
    pre-activation (``models.lean.chunked_mlp``)."""

    def __init__(
        self, width: int, hidden: int, chunk: int = 0, recompute_norm: bool = False, post_norm: bool = False
    ):
        super().__init__()
        self.norm = TokenBatchNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.chunk, self.recompute_norm, self.post_norm = chunk, recompute_norm, post_norm

    def forward(self, x: torch.Tensor, output: bool = True) -> torch.Tensor:
        """``output`` False: only what backward keeps is computed (a checkpointed block's recomputation, where
        the MLP comes last); the result is then zeros. A post-norm MLP always computes its output: its norm's
        backward needs it."""
        norm, fc1, fc2 = self.norm, self.fc1, self.fc2
        lean = self.chunk and lean_applies(x, norm)
        if self.post_norm:
            if lean:
                return norm(chunked_mlp(x, fc1, fc2, self.chunk))
            return linear_norm(fc2, norm, F.gelu(fc1(x)), self.recompute_norm)
        if not lean:
            return fc2(F.gelu(norm_linear(norm, fc1, x, self.recompute_norm)))
        if self.recompute_norm:
            return chunked_mlp(x, fc1, fc2, self.chunk, norm, output)
        # the norm's output goes in, kept by the norm's own autograd
        return chunked_mlp(norm(x), fc1, fc2, self.chunk, output=output)


class SideBlock(nn.Module):
    """One side block: fuse a tap, then temporal, spatial-attention and MLP residual parts.

    Args:
        post_norm: the E/14 block (each part's output normalised) instead of the CLIP one (pre-norm).
        own_pos_embed: hold a position embedding of its own (``pos_embed: per_block``); otherwise the shared
            one is passed to ``forward``.
    """

    def __init__(
        self,
        cfg: SideConfig,
        backbone_width: int,
        tokens: int,
        post_norm: bool = False,
        own_pos_embed: bool = True,
    ):
        super().__init__()
        width, recompute = cfg.width, cfg.recompute_norms
        self.post_norm = post_norm
        self.fusion = TapFusion(backbone_width, width, post_norm, recompute)
        self.temporal = TemporalConv(width, cfg.temporal_kernel, recompute, post_norm)
        self.pos_embed = nn.Parameter(torch.zeros(tokens, width)) if own_pos_embed else None
        self.attn_norm = nn.LayerNorm(width)
        self.attn = SpatialAttention(width, cfg.num_heads, cfg.attention == "sdpa", recompute)
        self.mlp = Mlp(width, int(width * cfg.mlp_ratio), cfg.mlp_chunk, recompute, post_norm)

    def forward(self, x: torch.Tensor, tap: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, N, d) side tokens, tap (B*T, 1 + N, W) backbone tokens, pos (N, d) the shared position
        embedding (unused when the block has its own) -> (B, T, N, d)."""
        pos = self.pos_embed if self.pos_embed is not None else pos
        cls, patches = self.fusion(tap, x.shape[1])  # the tap stays in its handover dtype
        x = 0.5 * x + 0.5 * patches
        x = x + self.temporal(x)
        context = torch.cat([shift_class_token(cls).unsqueeze(2), x + pos], dim=2)  # (B, T, 1+N, d)
        x = x + self.attn(context, self.attn_norm, self.post_norm)
        # A recomputation for backward needs only what the MLP keeps, not the block's output.
        return x + self.mlp(x, output=not recomputing())


def _drain(queue: deque) -> Iterator[torch.Tensor]:
    while queue:
        yield queue.popleft()


class Side4Video(nn.Module):
    """Side network for recognition.

    Args:
        cfg: side network shape.
        backbone_width: width W of the frozen model's tokens.
        patch_size: the frozen model's patch size (the stem uses the same grid).
        grid: patches per side, so N = grid**2 tokens per frame.
        depth: number of side blocks = number of backbone taps.
        classifier: build the classification head (retrieval uses the tokens instead).
        family: the backbone's family ("clip" or "eva"), which ``side.block: auto`` follows.
    """

    def __init__(
        self,
        cfg: SideConfig,
        backbone_width: int,
        patch_size: int,
        grid: int,
        depth: int,
        classifier: bool = True,
        family: str = "clip",
    ):
        super().__init__()
        width, kernel, tokens = cfg.width, cfg.temporal_kernel, grid * grid
        self.block = cfg.block_for(family)
        post_norm, shared = self.block == "eva", cfg.pos_embed == "shared"
        self.stem = nn.Conv3d(
            3,
            width,
            (kernel, patch_size, patch_size),
            stride=(1, patch_size, patch_size),
            padding=(kernel // 2, 0, 0),
        )
        self.stem_norm = TokenBatchNorm(width)
        self.pos_embed = nn.Parameter(torch.zeros(tokens, width)) if shared else None  # (N, d)
        self.blocks = nn.ModuleList(
            SideBlock(cfg, backbone_width, tokens, post_norm, own_pos_embed=not shared) for _ in range(depth)
        )
        self.norm = nn.Identity() if post_norm else TokenBatchNorm(width)  # the E/14 release pools unnormed
        self.head = nn.Linear(width, cfg.num_classes) if classifier else None
        self.checkpoint = cfg.checkpoint
        self._init_weights(width, depth)

    def _init_weights(self, width: int, depth: int) -> None:
        """The published initialisation; the position embedding N(0, 0.01^2), N(0, 0.02^2) for E/14."""
        std_in = (2 * width) ** -0.5
        std_out = width**-0.5 * (2 * depth) ** -0.5
        pos_std = 0.02 if self.block == "eva" else 0.01
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=pos_std)
        for block in self.blocks:
            nn.init.normal_(block.fusion.proj.weight, std=std_in)
            nn.init.normal_(block.attn.in_proj.weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=std_out)
            nn.init.normal_(block.mlp.fc1.weight, std=std_in)
            nn.init.normal_(block.mlp.fc2.weight, std=std_out)
            # Unpublished: the temporal pointwise convs follow the MLP's rule.
            nn.init.normal_(block.temporal.pw_in.weight, std=std_in)
            nn.init.normal_(block.temporal.pw_out.weight, std=std_out)
            if block.pos_embed is not None:
                nn.init.normal_(block.pos_embed, std=pos_std)
            for linear in (
                block.fusion.proj,
                block.attn.in_proj,
                block.attn.out_proj,
                block.mlp.fc1,
                block.mlp.fc2,
                block.temporal.pw_in,
                block.temporal.pw_out,
            ):
                nn.init.zeros_(linear.bias)
        # LayerNorm and BatchNorm default to weight 1, bias 0, as published.

    def forward_features(self, frames: torch.Tensor, taps: Iterable[torch.Tensor]) -> torch.Tensor:
        """Run the stem, then one side block per tap.

        Under autograd every tap is kept for the backward anyway (its projection's weight gradient needs it),
        so the frozen backbone runs to its end before the side network starts: the frozen blocks' transients
        then never coexist with what the side network keeps (BENCHMARKS.md: 13% lower peak at B/16, batch
        12, float32). Without grad each tap is consumed, and dropped, as the backbone yields it.

        Args:
            frames: (B, T, 3, H, W) normalised pixels.
            taps: the backbone's tapped outputs, each (B*T, 1 + N, W), in block order.
        Returns:
            (B, T, N, d) side tokens.
        """
        if torch.is_grad_enabled():
            taps = _drain(deque(taps))  # each one released by the queue as its block takes it
        x = self.stem(frames.transpose(1, 2))  # (B, d, T, h, w)
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T, N, d)
        x = self.stem_norm(x)
        consumed = 0
        for tap in taps:
            if consumed == len(self.blocks):
                raise ValueError(f"backbone yields more taps than the {len(self.blocks)} side blocks")
            block = self.blocks[consumed]
            last = consumed == len(self.blocks) - 1  # its recomputation would follow its forward at once
            if self.checkpoint and torch.is_grad_enabled() and not last:
                x = checkpoint(
                    block, x, tap, self.pos_embed, use_reentrant=False, context_fn=checkpoint_contexts
                )
            else:
                x = block(x, tap, self.pos_embed)
            consumed += 1
        if consumed != len(self.blocks):
            raise ValueError(f"backbone yielded {consumed} taps for {len(self.blocks)} side blocks")
        return x

    def forward(self, frames: torch.Tensor, taps: Iterable[torch.Tensor]) -> torch.Tensor:
        """(B, T, 3, H, W) frames + taps -> (B, num_classes) logits."""
        x = self.norm(self.forward_features(frames, taps))
        return self.head(x.mean(dim=(1, 2)))


def load_side_weights(side: nn.Module, path: str | Path) -> str:
    """Load ``side.init_from`` (a ``side.safetensors``, or the directory holding one) into ``side`` strictly:
    every parameter and buffer (BatchNorm running statistics included), nothing else, shapes equal.

    Returns:
        a one-line note for the log.
    Raises:
        ValueError: the file is absent, or does not match (listing every missing, unexpected and mismatched
            tensor at once, before anything is loaded).
    """
    from safetensors import safe_open

    source = Path(path)
    if source.is_dir():
        source = source / "side.safetensors"
    if not source.is_file() or source.suffix != ".safetensors":
        raise ValueError(f"{path}: no side.safetensors there (write one with launch.convert_checkpoint)")
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    problems = fit_problems(side.state_dict(), tensors)
    if any(problems.values()):
        listed = ", ".join(f"{len(names)} {kind} {names}" for kind, names in problems.items())
        raise ValueError(f"{source} does not fit the side network: {listed}")
    side.load_state_dict(tensors, strict=True)
    params = sum(tensors[name].numel() for name, _ in side.named_parameters())
    epoch = f", release epoch {metadata['epoch']}" if "epoch" in metadata else ""
    return f"{len(tensors)} tensors, {params:,} parameters{epoch}"


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, position embeddings and relative-position-bias tables are not decayed."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "relative_position_bias_table"))


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
