"""Memory-lean building blocks of the side network: what autograd keeps for backward, and when it recomputes.

- ``TokenBatchNorm``: BatchNorm3d over (B, T, N, d) tokens that leaves its running statistics alone while a
  checkpointed block is recomputed (``checkpoint_contexts``).
- Fused norm + linear functions that keep a layer's input and a norm's statistics instead of the norm's
  input or output: ``norm_project`` / ``project_norm`` for a frozen tap (LayerNorm then Linear, as in the
  CLIP side network, or Linear then LayerNorm, as in the E/14 one), ``norm_linear`` (pre-norm) and
  ``linear_norm`` (post-norm) inside the side blocks.
- ``chunked_mlp``: the MLP's GELU, second GEMM and hidden-width gradients a chunk of tokens at a time.

Each computes what plain autograd computes (tests/test_models.py and tests/test_side_release.py compare the
gradients); they apply in a training forward that builds a graph, without autocast.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

_recomputing = False  # set while a checkpointed block re-runs its forward inside the backward pass


def recomputing() -> bool:
    """Whether a checkpointed block is being recomputed for backward right now."""
    return _recomputing


@contextmanager
def _recompute():
    global _recomputing
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: (the first forward, the recomputation)."""
    return nullcontext(), _recompute()


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


def autocast_enabled(device: str) -> bool:
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # (not on "meta")


def lean_applies(x: torch.Tensor, norm: nn.Module) -> bool:
    """Whether the recomputing autograd functions apply: a training forward that builds a graph, without
    autocast (they compute in the weights' dtype)."""
    return torch.is_grad_enabled() and norm.training and not autocast_enabled(x.device.type)


def _compute_dtype(tap: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = tap.device.type
    return torch.get_autocast_dtype(device) if autocast_enabled(device) else weight.dtype


# -- a frozen tap into side width ----------------------------------------------------------------------------


class _NormProject(torch.autograd.Function):
    """``linear(layer_norm(tap))`` for a tap without autograd history, keeping only the tap itself (in the
    dtype it was handed over in) and its per-token statistics for backward: the float32 copy and the
    normalised tokens, each W wide, are recomputed there instead of being stored for every side block, and
    no (tokens, W) gradient is formed (the tap needs none)."""

    @staticmethod
    def forward(ctx, tap, norm_weight, norm_bias, weight, bias, eps: float):
        ctx.compute = _compute_dtype(tap, weight)
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


def norm_project(tap: torch.Tensor, norm: nn.LayerNorm, proj: nn.Linear) -> torch.Tensor:
    """``proj(norm(tap))`` for a frozen tap (pre-norm fusion), keeping only the tap and its statistics."""
    return _NormProject.apply(tap, norm.weight, norm.bias, proj.weight, proj.bias, norm.eps)


class _ProjectNorm(torch.autograd.Function):
    """``layer_norm(linear(tap))`` for a tap without autograd history (post-norm fusion), keeping the tap in
    the dtype it was handed over in (no copy in the weights' dtype) and the norm's statistics. The projection
    (tokens, d) is kept too, or with ``recompute`` computed again in backward (one more GEMM). No (tokens, W)
    gradient is formed (the tap needs none)."""

    @staticmethod
    def forward(ctx, tap, weight, bias, norm_weight, norm_bias, eps: float, recompute: bool):
        ctx.compute = _compute_dtype(tap, weight)
        projected = F.linear(tap.to(ctx.compute), weight.to(ctx.compute), bias.to(ctx.compute))
        projected = projected.to(norm_weight.dtype)  # (..., d); float32 under autocast, as its layer_norm
        shape = projected.shape[-1:]
        out, mean, rstd = torch.native_layer_norm(projected, shape, norm_weight, norm_bias, eps)
        kept = None if recompute else projected
        ctx.save_for_backward(tap, kept, mean, rstd, weight, bias, norm_weight, norm_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tap, projected, mean, rstd, weight, bias, norm_weight, norm_bias = ctx.saved_tensors
        tokens = tap.to(ctx.compute)
        if projected is None:
            projected = F.linear(tokens, weight.to(ctx.compute), bias.to(ctx.compute)).to(norm_weight.dtype)
        grad_projected, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out, projected, projected.shape[-1:], mean, rstd, norm_weight, norm_bias, [True, True, True]
        )
        grad = grad_projected.flatten(0, -2).to(ctx.compute)  # (tokens, d)
        grad_weight = (grad.t() @ tokens.flatten(0, -2)).to(weight.dtype)
        grad_bias = grad.sum(0, dtype=weight.dtype)
        return None, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias, None, None


def project_norm(tap: torch.Tensor, proj: nn.Linear, norm: nn.LayerNorm, recompute: bool) -> torch.Tensor:
    """``norm(proj(tap))`` for a frozen tap (post-norm fusion); ``recompute``: the projection is not kept."""
    return _ProjectNorm.apply(tap, proj.weight, proj.bias, norm.weight, norm.bias, norm.eps, recompute)


# -- norms beside linear layers inside a side block ----------------------------------------------------------


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


def norm_linear(norm: nn.Module, linear: nn.Linear, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``linear(norm(x))`` (pre-norm); ``recompute``: keep only x and the norm's statistics for backward."""
    if recompute and lean_applies(x, norm):
        return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm)
    return linear(norm(x))


class _LinearNorm(torch.autograd.Function):
    """``norm(linear(x))`` keeping only x (which the linear layer's backward needs anyway) and the norm's
    statistics: the linear output, which the norm's backward reads, is recomputed there (one GEMM) instead
    of being stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, norm_bias, norm: nn.Module):
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        normed, mean, rstd = _norm_forward(norm, F.linear(flat, weight, bias))
        ctx.save_for_backward(flat, weight, bias, mean, rstd, norm_weight, norm_bias)
        ctx.norm, ctx.shape = norm, x.shape
        return normed.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, bias, mean, rstd, norm_weight, norm_bias = ctx.saved_tensors
        projected = F.linear(flat, weight, bias)  # (tokens, out), recomputed
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_projected, grad_norm_weight, grad_norm_bias = _norm_backward(
            ctx.norm, grad, projected, mean, rstd, norm_weight, norm_bias
        )
        grad_x = (grad_projected @ weight).view(ctx.shape)
        grad_weight = grad_projected.t() @ flat
        return grad_x, grad_weight, grad_projected.sum(0), grad_norm_weight, grad_norm_bias, None


def linear_norm(linear: nn.Linear, norm: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``norm(linear(x))`` (post-norm); ``recompute``: the linear output is not kept for the norm."""
    if recompute and lean_applies(x, norm):
        return _LinearNorm.apply(x, linear.weight, linear.bias, norm.weight, norm.bias, norm)
    return norm(linear(x))


# -- the MLP in chunks of tokens -----------------------------------------------------------------------------


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


def chunked_mlp(
    x: torch.Tensor,
    fc1: nn.Linear,
    fc2: nn.Linear,
    chunk: int,
    norm: TokenBatchNorm | None = None,
    output: bool = True,
) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` (``norm`` None: ``fc2(gelu(fc1(x)))``) over ``chunk`` tokens at a time,
    keeping x, the norm's statistics and the pre-activation. ``output`` False: only what backward keeps is
    computed and the result is zeros (a recomputation for backward that needs nothing after the MLP)."""
    norm_weight, norm_bias = (norm.weight, norm.bias) if norm is not None else (None, None)
    params = norm_weight, norm_bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias
    return _NormMlp.apply(x, *params, norm, chunk, output)
