"""Side4Video: a spatial-temporal side network beside a frozen image ViT (arXiv 2311.15769).

The side stream keeps patch tokens only, laid out channels-last as (B, T, N, d). At every tapped backbone
block it fuses that block's output (0.5 side + 0.5 projected backbone patches) and runs one side block:
temporal depthwise conv, spatial attention whose keys include the time-shifted class token, and an MLP.
No gradient reaches the backbone: its taps arrive without autograd history.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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
    """Each norm that feeds a linear layer (the temporal conv's and the MLP's batch norms, the attention's
    layer norm) keeps only its input and statistics for backward and recomputes its output there, instead of
    both it and the linear layer keeping a copy."""

    def __post_init__(self):
        if self.width < 1 or self.num_classes < 1:
            raise ValueError("side.width and side.num_classes must be positive")
        if self.num_heads < 1 or self.width % self.num_heads:
            raise ValueError(f"side.heads={self.num_heads} must divide side.width={self.width}")
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


_recomputing = False  # set while a checkpointed block re-runs its forward inside the backward pass


@contextmanager
def _recompute():
    global _recomputing
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False


def _checkpoint_contexts():
    return nullcontext(), _recompute()  # (the first forward, the recomputation)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm3d over the channel axis of (B, T, N, d) tokens, without a channels-first copy.

    A checkpointed block's recomputation normalises with the same batch statistics but leaves the running
    statistics alone: they are updated once per forward, as without checkpointing.
    """

    def momentum_now(self) -> float:
        """The running statistics' update factor for a training forward (what ``BatchNorm1d.forward``
        uses; it counts the batch): 0 in a checkpointed recomputation."""
        if _recomputing:
            return 0.0
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not self.training:
            return super().forward(flat).view_as(x)
        # In a recomputation momentum 0 leaves the running statistics as they are, with the same saved
        # tensors as the first forward (checkpointing compares them).
        stats = self.running_mean, self.running_var
        momentum = self.momentum_now()
        return F.batch_norm(flat, *stats, self.weight, self.bias, True, momentum, self.eps).view_as(x)


def shift_class_token(cls: torch.Tensor) -> torch.Tensor:
    """Half the channels from frame t+1, half from t-1, zeros past the ends. (B, T, d) -> (B, T, d)."""
    batch, _, width = cls.shape
    half = width // 2
    zeros_fwd = cls.new_zeros(batch, 1, half)
    zeros_bwd = cls.new_zeros(batch, 1, width - half)
    from_next = torch.cat([cls[:, 1:, :half], zeros_fwd], dim=1)
    from_prev = torch.cat([zeros_bwd, cls[:, :-1, half:]], dim=1)
    return torch.cat([from_next, from_prev], dim=-1)


def _autocast_enabled(device: str) -> bool:
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # (not on "meta")


class _NormProject(torch.autograd.Function):
    """``linear(layer_norm(tap))`` for a tap without autograd history, keeping only the tap itself (in the
    dtype it was handed over in) and its per-token statistics for backward: the float32 copy and the
    normalised tokens, each W wide, are recomputed there instead of being stored for every side block, and
    no (tokens, W) gradient is formed (the tap needs none)."""

    @staticmethod
    def forward(ctx, tap, norm_weight, norm_bias, weight, bias, eps: float):
        device = tap.device.type
        ctx.compute = torch.get_autocast_dtype(device) if _autocast_enabled(device) else weight.dtype
        normed, mean, rstd = torch.native_layer_norm(
            tap.to(weight.dtype), tap.shape[-1:], norm_weight, norm_bias, eps
        )
        ctx.save_for_backward(tap, mean, rstd, norm_weight, norm_bias, weight)
        return F.linear(normed.to(ctx.compute), weight.to(ctx.compute), bias.to(ctx.compute))

    @staticmethod
    def backward(ctx, grad_out):
        tap, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        # (tokens, W) normalised tap, recomputed
        xhat = ((tap.to(weight.dtype) - mean) * rstd).flatten(0, -2).to(ctx.compute)
        grad = grad_out.flatten(0, -2).to(ctx.compute)  # (tokens, d)
        # One GEMM serves all four gradients: with normed = xhat * g + b and M = grad^T xhat (d, W),
        # grad^T normed = M * g + outer(sum(grad), b), and the norm's gradients are column sums of weight * M.
        outer = (grad.t() @ xhat).to(weight.dtype)  # M
        grad_bias = grad.sum(0, dtype=weight.dtype)
        grad_weight = outer * norm_weight + grad_bias[:, None] * norm_bias
        grad_norm_weight = (weight * outer).sum(0)
        grad_norm_bias = grad_bias @ weight
        return None, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None


class TapFusion(nn.Module):
    """LayerNorm + Linear from a backbone block's tokens into side width."""

    def __init__(self, backbone_width: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(backbone_width)
        self.proj = nn.Linear(backbone_width, width)

    def forward(self, tokens: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*T, 1 + N, W) -> class (B, T, d), patches (B, T, N, d)."""
        if tokens.requires_grad:  # not a frozen tap: plain autograd
            projected = self.proj(self.norm(tokens))
        else:
            norm, proj = self.norm, self.proj
            projected = _NormProject.apply(tokens, norm.weight, norm.bias, proj.weight, proj.bias, norm.eps)
        projected = projected.unflatten(0, (-1, frames))  # (B, T, 1 + N, d)
        return projected[:, :, 0], projected[:, :, 1:]


def _row_chunks(rows: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


def _add_product(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator += left @ right, accumulating in the accumulator's dtype (float32 for bf16 compute)."""
    if accumulator.dtype == left.dtype:
        accumulator.addmm_(left, right)
    else:
        accumulator.add_(left @ right)


def _norm_forward(norm: nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, d) -> normalised tokens and the two statistics the norm's backward needs."""
    if isinstance(norm, TokenBatchNorm):
        stats = norm.running_mean, norm.running_var
        return torch.native_batch_norm(
            flat, norm.weight, norm.bias, *stats, True, norm.momentum_now(), norm.eps
        )
    return torch.native_layer_norm(flat, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _norm_recompute(flat: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight, bias) -> torch.Tensor:
    """The normalised tokens again, from the input and the saved statistics (per token or per channel)."""
    return torch.addcmul(bias, (flat - mean) * rstd, weight)


def _norm_backward(norm: nn.Module, grad: torch.Tensor, flat: torch.Tensor, mean, rstd, weight, bias):
    """Gradients of a norm's input, weight and bias from the gradient of its output."""
    if isinstance(norm, TokenBatchNorm):
        return torch.ops.aten.native_batch_norm_backward(
            grad, flat, weight, None, None, mean, rstd, True, norm.eps, [True, True, True]
        )
    return torch.ops.aten.native_layer_norm_backward(
        grad, flat, norm.normalized_shape, mean, rstd, weight, bias, [True, True, True]
    )


class _NormLinear(torch.autograd.Function):
    """``linear(norm(x))`` keeping only x and the norm's statistics for backward: the normalised tokens, as
    large as x, are recomputed there (one elementwise pass) instead of being stored."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, norm: nn.Module):
        flat = x.reshape(-1, x.shape[-1])  # (tokens, d)
        normed, mean, rstd = _norm_forward(norm, flat)
        ctx.save_for_backward(flat, mean, rstd, norm_weight, norm_bias, weight)
        ctx.norm, ctx.shape = norm, x.shape
        return F.linear(normed, weight, bias).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        flat, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        grad_weight = grad.t() @ _norm_recompute(flat, mean, rstd, norm_weight, norm_bias)
        grad_x, grad_norm_weight, grad_norm_bias = _norm_backward(
            ctx.norm, grad @ weight, flat, mean, rstd, norm_weight, norm_bias
        )
        return grad_x.view(ctx.shape), grad_norm_weight, grad_norm_bias, grad_weight, grad.sum(0), None


class _NormMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(norm(x))))`` keeping only x, the norm's statistics and the pre-activation for backward.
    The GELU, the second GEMM and every hidden-width gradient run over ``chunk`` tokens at a time, so neither
    the GELU output nor a hidden gradient, each (tokens, 4d), ever exists whole; the GEMMs are the ones plain
    autograd runs. ``norm``: a TokenBatchNorm (per-channel statistics: its output is recomputed a chunk at a
    time in backward), or None (x goes straight into fc1)."""

    @staticmethod
    def forward(
        ctx, x, norm_weight, norm_bias, w1, b1, w2, b2, norm: nn.Module | None, chunk: int, output: bool
    ):
        flat = x.reshape(-1, x.shape[-1])  # (tokens, d)
        normed, mean, rstd = _norm_forward(norm, flat) if norm is not None else (flat, None, None)
        hidden = F.linear(normed, w1, b1)  # (tokens, 4d) pre-activation, kept
        del normed  # (not kept: recomputed in backward)
        ctx.save_for_backward(flat, hidden, w1, w2, mean, rstd, norm_weight, norm_bias)
        ctx.norm, ctx.chunk, ctx.shape = norm, chunk, x.shape
        if not output:  # only what backward keeps is wanted: skip the GELU and the second GEMM
            return flat.new_zeros(()).expand(x.shape)
        out = flat.new_empty(flat.shape[0], w2.shape[0])  # (tokens, d)
        for rows in _row_chunks(flat.shape[0], chunk):
            torch.addmm(b2, F.gelu(hidden[rows]), w2.t(), out=out[rows])
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, hidden, w1, w2, mean, rstd, norm_weight, norm_bias = ctx.saved_tensors
        norm = ctx.norm
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, d)
        accumulate = torch.promote_types(w1.dtype, torch.float32)
        grad_w1 = torch.zeros(w1.shape, dtype=accumulate, device=w1.device)  # (4d, d)
        grad_w2 = torch.zeros(w2.shape, dtype=accumulate, device=w2.device)  # (d, 4d)
        grad_b1 = torch.zeros(w1.shape[0], dtype=accumulate, device=w1.device)
        grad_normed = torch.empty_like(flat)
        for rows in _row_chunks(flat.shape[0], ctx.chunk):
            pre, upstream = hidden[rows], grad[rows]
            _add_product(grad_w2, upstream.t(), F.gelu(pre))
            grad_hidden = torch.ops.aten.gelu_backward(upstream @ w2, pre)  # (chunk, 4d)
            grad_b1 += grad_hidden.sum(0, dtype=accumulate)
            normed = flat[rows]
            if norm is not None:
                normed = _norm_recompute(normed, mean, rstd, norm_weight, norm_bias)
            _add_product(grad_w1, grad_hidden.t(), normed)
            torch.mm(grad_hidden, w1, out=grad_normed[rows])
        grad_x, grad_norm_weight, grad_norm_bias = grad_normed, None, None
        if norm is not None:
            grad_x, grad_norm_weight, grad_norm_bias = _norm_backward(
                norm, grad_normed, flat, mean, rstd, norm_weight, norm_bias
            )
        grads = grad_w1.to(w1.dtype), grad_b1.to(w1.dtype), grad_w2.to(w2.dtype), grad.sum(0)
        return grad_x.view(ctx.shape), grad_norm_weight, grad_norm_bias, *grads, None, None, None


def _lean(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether the recomputing autograd functions apply: a training forward that builds a graph, without
    autocast (they compute in the weights' dtype)."""
    return torch.is_grad_enabled() and norm.training and not _autocast_enabled(x.device.type)


def norm_linear(norm: nn.Module, linear: nn.Linear, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``linear(norm(x))``; ``recompute``: keep only x and the norm's statistics for backward."""
    if recompute and _lean(x, norm):
        return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm)
    return linear(norm(x))


class TemporalConv(nn.Module):
    """Norm, pointwise, depthwise conv over time, pointwise."""

    def __init__(self, width: int, kernel: int, recompute_norm: bool = False):
        super().__init__()
        self.norm = TokenBatchNorm(width)
        self.pw_in = nn.Linear(width, width)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.pw_out = nn.Linear(width, width)
        self.recompute_norm = recompute_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, width = x.shape
        y = norm_linear(self.norm, self.pw_in, x, self.recompute_norm)
        y = y.permute(0, 2, 3, 1).reshape(batch * tokens, width, frames)  # (B*N, d, T)
        y = self.depthwise(y)
        y = y.view(batch, tokens, width, frames).permute(0, 3, 1, 2)  # (B, T, N, d)
        return self.pw_out(y)


class SpatialAttention(nn.Module):
    """Attention within each frame: patch-token queries; keys/values also see the shifted class token."""

    def __init__(self, width: int, heads: int, fused: bool = True, recompute_norm: bool = False):
        super().__init__()
        self.heads, self.fused, self.recompute_norm = heads, fused, recompute_norm
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, context: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """(B, T, 1 + N, d) [class, patches] and their pre-norm -> (B, T, N, d) update for the patches."""
        batch, frames, length, width = context.shape
        qkv = norm_linear(norm, self.in_proj, context, self.recompute_norm)
        qkv = qkv.view(batch * frames, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B*T, heads, 1 + N, head_dim)
        if self.fused:
            out = F.scaled_dot_product_attention(q[:, :, 1:], k, v)  # (B*T, heads, N, head_dim)
        else:
            weights = (q[:, :, 1:] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B*T, heads, N, 1 + N)
            out = weights.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, frames, length - 1, width)
        return self.out_proj(out)


class Mlp(nn.Module):
    """Norm, Linear, GELU, Linear. ``chunk`` > 0: the MLP's GELU, second GEMM and hidden-width gradients run
    over that many tokens at a time, keeping only the pre-activation (``_NormMlp``)."""

    def __init__(self, width: int, hidden: int, chunk: int = 0, recompute_norm: bool = False):
        super().__init__()
        self.norm = TokenBatchNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.chunk, self.recompute_norm = chunk, recompute_norm

    def forward(self, x: torch.Tensor, output: bool = True) -> torch.Tensor:
        """``output`` False: only what backward keeps is computed (a checkpointed block's recomputation, where
        the MLP comes last); the result is then zeros."""
        if not (self.chunk and _lean(x, self.norm)):
            return self.fc2(F.gelu(norm_linear(self.norm, self.fc1, x, self.recompute_norm)))
        norm, fc1, fc2 = self.norm, self.fc1, self.fc2
        params = norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias
        if not self.recompute_norm:  # the norm's output goes in, kept by the norm's own autograd
            x, norm = norm(x), None
        return _NormMlp.apply(x, *params, norm, self.chunk, output)


class SideBlock(nn.Module):
    """One side block: fuse a tap, then temporal, spatial-attention and MLP residual parts."""

    def __init__(self, cfg: SideConfig, backbone_width: int, tokens: int):
        super().__init__()
        width, recompute = cfg.width, cfg.recompute_norms
        self.fusion = TapFusion(backbone_width, width)
        self.temporal = TemporalConv(width, cfg.temporal_kernel, recompute)
        self.pos_embed = nn.Parameter(torch.zeros(tokens, width))
        self.attn_norm = nn.LayerNorm(width)
        self.attn = SpatialAttention(width, cfg.num_heads, cfg.attention == "sdpa", recompute)
        self.mlp = Mlp(width, int(width * cfg.mlp_ratio), cfg.mlp_chunk, recompute)

    def forward(self, x: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, d) side tokens, tap (B*T, 1 + N, W) backbone tokens -> (B, T, N, d)."""
        cls, patches = self.fusion(tap, x.shape[1])  # the tap stays in its handover dtype
        x = 0.5 * x + 0.5 * patches
        x = x + self.temporal(x)
        context = torch.cat(
            [shift_class_token(cls).unsqueeze(2), x + self.pos_embed], dim=2
        )  # (B, T, 1+N, d)
        x = x + self.attn(context, self.attn_norm)
        # A recomputation for backward needs only what the MLP keeps, not the block's output.
        return x + self.mlp(x, output=not _recomputing)


class Side4Video(nn.Module):
    """Side network for recognition.

    Args:
        cfg: side network shape.
        backbone_width: width W of the frozen model's tokens.
        patch_size: the frozen model's patch size (the stem uses the same grid).
        grid: patches per side, so N = grid**2 tokens per frame.
        depth: number of side blocks = number of backbone taps.
        classifier: build the classification head (retrieval uses the tokens instead).
    """

    def __init__(
        self,
        cfg: SideConfig,
        backbone_width: int,
        patch_size: int,
        grid: int,
        depth: int,
        classifier: bool = True,
    ):
        super().__init__()
        width, kernel = cfg.width, cfg.temporal_kernel
        self.stem = nn.Conv3d(
            3,
            width,
            (kernel, patch_size, patch_size),
            stride=(1, patch_size, patch_size),
            padding=(kernel // 2, 0, 0),
        )
        self.stem_norm = TokenBatchNorm(width)
        self.blocks = nn.ModuleList(SideBlock(cfg, backbone_width, grid * grid) for _ in range(depth))
        self.norm = TokenBatchNorm(width)
        self.head = nn.Linear(width, cfg.num_classes) if classifier else None
        self.checkpoint = cfg.checkpoint
        self._init_weights(width, depth)

    def _init_weights(self, width: int, depth: int) -> None:
        std_in = (2 * width) ** -0.5
        std_out = width**-0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.fusion.proj.weight, std=std_in)
            nn.init.normal_(block.attn.in_proj.weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=std_out)
            nn.init.normal_(block.mlp.fc1.weight, std=std_in)
            nn.init.normal_(block.mlp.fc2.weight, std=std_out)
            # Unpublished: the temporal pointwise convs follow the MLP's rule.
            nn.init.normal_(block.temporal.pw_in.weight, std=std_in)
            nn.init.normal_(block.temporal.pw_out.weight, std=std_out)
            nn.init.normal_(block.pos_embed, std=0.01)
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
        """Run the stem, then one side block per tap as the taps arrive.

        Args:
            frames: (B, T, 3, H, W) normalised pixels.
            taps: the backbone's tapped outputs, each (B*T, 1 + N, W), in block order.
        Returns:
            (B, T, N, d) side tokens.
        """
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
                x = checkpoint(block, x, tap, use_reentrant=False, context_fn=_checkpoint_contexts)
            else:
                x = block(x, tap)
            consumed += 1
        if consumed != len(self.blocks):
            raise ValueError(f"backbone yielded {consumed} taps for {len(self.blocks)} side blocks")
        return x

    def forward(self, frames: torch.Tensor, taps: Iterable[torch.Tensor]) -> torch.Tensor:
        """(B, T, 3, H, W) frames + taps -> (B, num_classes) logits."""
        x = self.norm(self.forward_features(frames, taps))
        return self.head(x.mean(dim=(1, 2)))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, position embeddings and relative-position-bias tables are not decayed."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "relative_position_bias_table"))


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
