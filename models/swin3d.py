"""Video Swin Transformer with an image stream that shares every weight but the patch embedding (BEVT).

One encoder, two inputs:
- video (B, 3, T, H, W): a 3D patch embedding (Conv3d, stride (2, 4, 4) at Swin-B) and 3D windows (8, 7, 7);
- images (B, 3, H, W): a 2D patch embedding (Conv2d, stride 4) and 2D windows (7, 7), i.e. a video of one
  temporal slot. A window never exceeds its input (Video Swin's rule: a dimension no larger than the window is
  attended whole and not shifted), so images get windows (1, 7, 7) and shift (0, 3, 3).
Every block, patch merging and the mask token are shared. The relative-position-bias table is 3D,
(2Wt - 1)(2Wh - 1)(2Ww - 1) x heads, and is always indexed with the table's own strides: a window of one slot
reads exactly the temporal-distance-0 slice, which is what the image stream uses.

Norms (``norms``): "released" (BEVT's release): each stream has its own patch-embedding norm (``norm`` for
video, ``norm2d`` for images), stage 3 is returned raw and stage 4 goes through ``norm`` only when the encoder
has a final norm (recognition; BEVT's decoders read both stages raw). "encoder" (the project's earlier
layout): one patch-embedding norm for both streams, and ``norm3`` / ``norm`` on stages 3 and 4.

Parameter names follow Swin / Video Swin (``patch_embed.proj``, ``layers.i.blocks.j.attn.qkv``,
``layers.i.downsample.reduction``, ``norm``). ``load_encoder_weights`` reads official Video Swin (mmaction),
Swin 2D (ImageNet, inflated), BEVT's released pretraining checkpoints and this project's runs.
Models here hold no distributed code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class SwinShape:
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    patch: tuple[int, int, int] = (2, 4, 4)
    window: tuple[int, int, int] = (8, 7, 7)
    mlp_ratio: float = 4.0


# "base" is BEVT's Swin-B; "demo" is what the CPU demos pretrain; "test" and "test7" (Swin's 7x7 windows, at
# 224 px) are for unit tests.
SWIN_SIZES: dict[str, SwinShape] = {
    "base": SwinShape(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "small": SwinShape(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "tiny": SwinShape(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "demo": SwinShape(48, (1, 1, 2, 1), (2, 4, 8, 16), window=(4, 3, 3), mlp_ratio=2.0),
    "test": SwinShape(16, (1, 1, 2, 1), (1, 2, 2, 4), window=(2, 4, 4), mlp_ratio=2.0),
    "test7": SwinShape(8, (2, 2, 2, 2), (1, 1, 2, 2), window=(2, 7, 7), mlp_ratio=2.0),
}


@dataclass
class SwinConfig:
    """The Video Swin encoder (BEVT pretraining, and recognition with ``model: video_swin``)."""

    name: str = "demo"
    """Named shape (see SWIN_SIZES): base (Swin-B, BEVT's), small, tiny, demo, test."""
    image_size: int = 96
    """Input pixels per side; every stage's grid must be a multiple of the window or no larger than it."""
    drop_path: float = 0.1
    """Stochastic-depth rate of the last block (linearly increasing from 0; BEVT: 0.3 at Swin-B)."""
    checkpoint: bool = False
    """Recompute each block in the backward pass (activation checkpointing)."""
    init_from: str | None = None
    """Initial weights: a run directory (its newest complete checkpoint) or a state-dict file: this project's
    BEVT or recognition runs, official Video Swin (mmaction), Swin 2D ImageNet (inflated) or BEVT's released
    pretraining checkpoints. What the file lacks by design (mask token, 2D patch embedding, a new decoder or
    head) keeps its initialisation; the load note in the log names it."""
    inflate: bool = False
    """Treat ``init_from`` as image weights: inflate its image patch embedding (kernel, and its norm into the
    video stream's) and the temporal-distance-0 slice of its bias tables to 3D (BEVT stage 2 from the
    image-only stage 1). Swin 2D files (4-D patch kernel) are inflated without it."""
    num_classes: int = 8
    """Recognition (model: video_swin): classes of the linear head on the pooled stage-4 features."""
    head_dropout: float = 0.5
    """Dropout before the recognition head."""

    def __post_init__(self):
        if self.name not in SWIN_SIZES:
            raise ValueError(f"swin.name: unknown size {self.name!r}; known: {sorted(SWIN_SIZES)}")
        if self.image_size % 32:
            raise ValueError(
                f"swin.image_size must be a multiple of 32 (4 x 2 x 2 x 2), got {self.image_size}"
            )
        if not 0 <= self.drop_path < 1 or not 0 <= self.head_dropout < 1:
            raise ValueError("swin.drop_path and swin.head_dropout must be in [0, 1)")
        if self.num_classes < 1:
            raise ValueError(f"swin.num_classes must be >= 1, got {self.num_classes}")
        check_fit(self.shape, self.image_size)

    @property
    def shape(self) -> SwinShape:
        return SWIN_SIZES[self.name]


def check_fit(shape: SwinShape, image_size: int, frames: int | None = None) -> None:
    """Raise a ValueError naming the setting unless every stage's token grid (and, with ``frames``, the
    temporal slots) is a multiple of the window or no larger than it (windows are never padded here)."""
    grids = [image_size // (shape.patch[1] * 2**i) for i in range(len(shape.depths))]
    if any(g > shape.window[1] and g % shape.window[1] for g in grids):
        raise ValueError(
            f"swin.image_size: {image_size} px gives stage grids {grids}, which the {shape.window[1:]} "
            "window does not tile; pick a size whose grids are multiples of the window (or no larger)"
        )
    if frames is not None:
        slots = frames // shape.patch[0]
        if frames % shape.patch[0] or (slots > shape.window[0] and slots % shape.window[0]):
            raise ValueError(
                f"data.num_frames: {frames} frames must be a multiple of the temporal patch {shape.patch[0]} "
                f"and give temporal slots that the window's {shape.window[0]} tiles"
            )


def window_for(size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]):
    """Video Swin's rule: a dimension no larger than the window is attended whole, without shift."""
    used = tuple(min(s, w) for s, w in zip(size, window, strict=True))
    shifted = tuple(0 if s <= w else h for s, w, h in zip(size, window, shift, strict=True))
    return used, shifted


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, nW, Wt*Wh*Ww, C)."""
    b, t, h, w, c = x.shape
    wt, wh, ww = window
    x = x.view(b, t // wt, wt, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, wt * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int, int], size: tuple[int, int, int]):
    """(B, nW, Wt*Wh*Ww, C) -> (B, T, H, W, C)."""
    b, _, _, c = windows.shape
    (wt, wh, ww), (t, h, w) = window, size
    x = windows.view(b, t // wt, h // wh, w // ww, wt, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, c)


@lru_cache(maxsize=64)
def relative_index(window: tuple[int, int, int], table: tuple[int, int, int]) -> torch.Tensor:
    """(N, N) indices into a (2Tt-1)(2Th-1)(2Tw-1) bias table for the tokens of one ``window`` (N tokens),
    using the strides of the full ``table`` window: a smaller window reads a sub-table (one slot: dt = 0)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N), each in (-(w-1), w-1)
    tt, th, tw = table
    return (
        (rel[0] + tt - 1) * (2 * th - 1) * (2 * tw - 1) + (rel[1] + th - 1) * (2 * tw - 1) + rel[2] + tw - 1
    )


@lru_cache(maxsize=64)
def shift_mask(size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]):
    """(nW, N, N) additive mask keeping cyclically shifted windows from mixing non-adjacent regions."""
    region = torch.zeros(1, *size, 1)
    label = 0
    slices = [
        (slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)
        for w, s in zip(window, shift, strict=True)
    ]
    for st in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                region[:, st, sh, sw, :] = label
                label += 1
    ids = window_partition(region, window)[0, :, :, 0]  # (nW, N)
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, float("-inf"))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a 3D relative position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int]):
        super().__init__()
        self.heads, self.window = heads, window
        size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(size, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self, window: tuple[int, int, int]) -> torch.Tensor:
        """(heads, N, N) bias of a window of ``window`` tokens (at most the table's window)."""
        index = relative_index(tuple(window), self.window).to(self.relative_position_bias_table.device)
        n = index.shape[0]
        return self.relative_position_bias_table[index.flatten()].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: tuple[int, int, int], mask: torch.Tensor | None):
        """x: (B, nW, N, C); mask: (nW, N, N) or None -> (B, nW, N, C)."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_bias(window).to(x.dtype)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask.to(x.dtype)[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # (B, nW, heads, N, d)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each a residual with stochastic depth."""

    def __init__(self, dim: int, heads: int, window, shift, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, C) -> same."""
        size = tuple(x.shape[1:4])
        window, shift = window_for(size, self.window, self.shift)
        if any(s % w for s, w in zip(size, window, strict=True)):
            raise ValueError(f"token grid {size} is not a multiple of the window {window}")
        shifted = (
            torch.roll(self.norm1(x), [-s for s in shift], dims=(1, 2, 3)) if any(shift) else self.norm1(x)
        )
        mask = shift_mask(size, window, shift).to(x.device) if any(shift) else None
        attended = window_reverse(self.attn(window_partition(shifted, window), window, mask), window, size)
        if any(shift):
            attended = torch.roll(attended, list(shift), dims=(1, 2, 3))
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve H and W (2 x 2 neighbours concatenated, normed, projected 4C -> 2C); T is kept."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, C) -> (B, T, H/2, W/2, 2C)."""
        parts = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, -1)))


class Stage(nn.Module):
    """Swin blocks (alternating plain and shifted windows), then optional patch merging."""

    def __init__(self, dim, depth, heads, window, mlp_ratio, drop_paths: list[float], merge: bool):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, (0, 0, 0) if i % 2 == 0 else shift, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if merge else None


class PatchEmbed(nn.Module):
    """The two streams' patch embeddings (the only unshared weights) and their norms (one per stream, or one
    shared)."""

    def __init__(self, dim: int, patch: tuple[int, int, int], per_stream: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(3, dim, patch, patch)  # video
        self.proj2d = nn.Conv2d(3, dim, patch[1:], patch[1:])  # images
        self.norm = nn.LayerNorm(dim)  # video's, or both streams' when not per stream
        self.norm2d = nn.LayerNorm(dim) if per_stream else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) video or (B, 3, H, W) images -> (B, T', H', W', C); images have T' = 1."""
        if x.ndim == 5:
            return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))
        norm = self.norm if self.norm2d is None else self.norm2d
        return norm(self.proj2d(x).unsqueeze(2).permute(0, 2, 3, 4, 1))


NORMS = ("released", "encoder")


class VideoSwin(nn.Module):
    """The shared encoder. ``forward`` returns every stage's output.

    Args:
        norms: "released" (per-stream patch-embedding norms; stages returned raw but for the final norm) or
            "encoder" (one patch-embedding norm; stages 3 and 4 normed by ``norm3`` and ``norm``).
        final_norm: with "released", whether the encoder has ``norm`` on stage 4 (recognition: yes; BEVT
            pretraining: no, its shared decoder norm follows the decoders).
    """

    def __init__(
        self,
        shape: SwinShape,
        drop_path: float = 0.0,
        use_checkpoint: bool = False,
        norms: str = "released",
        final_norm: bool = True,
    ):
        super().__init__()
        if norms not in NORMS:
            raise ValueError(f"bevt.norms: {norms!r} is not one of {NORMS}")
        self.shape, self.use_checkpoint, self.norms = shape, use_checkpoint, norms
        dims = [shape.embed_dim * 2**i for i in range(len(shape.depths))]
        self.dims = dims
        self.patch_embed = PatchEmbed(dims[0], shape.patch, per_stream=norms == "released")
        self.mask_token = nn.Parameter(torch.zeros(dims[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        blocks = sum(shape.depths)
        rates = [drop_path * i / max(1, blocks - 1) for i in range(blocks)]  # linear, as in Swin
        self.layers = nn.ModuleList()
        start = 0
        for i, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
            last = i == len(shape.depths) - 1
            rate = rates[start : start + depth]
            self.layers.append(Stage(dims[i], depth, heads, shape.window, shape.mlp_ratio, rate, not last))
            start += depth
        self.norm3 = nn.LayerNorm(dims[-2]) if norms == "encoder" else None  # the decoders' stage-3 input
        self.norm = nn.LayerNorm(dims[-1]) if norms == "encoder" or final_norm else None
        self.apply(_init_weights)

    @property
    def stride(self) -> int:
        """Pixels per stage-3 token (the masking and target grid): patch x 2 x 2."""
        return self.shape.patch[1] * 2 ** (len(self.shape.depths) - 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Encode video or images, with masked patches replaced by the mask token.

        Args:
            x: (B, 3, T, H, W) video or (B, 3, H, W) images, normalised.
            mask: bool at patch resolution (True = masked), (B, T', H', W') for video, (B, H', W') for images.
        Returns:
            per stage (B, T', H_i, W_i, C_i) with H_i = H / (4 * 2^i); the last through ``norm`` when the
            encoder has one, the one before through ``norm3`` when it has one.
        """
        tokens = self.patch_embed(x)  # (B, T', H', W', C)
        if mask is not None:
            mask = mask.view(tokens.shape[:4]).unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - mask) + self.mask_token.to(tokens.dtype) * mask
        outputs = []
        for stage in self.layers:
            for block in stage.blocks:
                if self.use_checkpoint and tokens.requires_grad:
                    tokens = checkpoint(block, tokens, use_reentrant=False)
                else:
                    tokens = block(tokens)
            outputs.append(tokens)
            if stage.downsample is not None:
                tokens = stage.downsample(tokens)
        if self.norm3 is not None:
            outputs[-2] = self.norm3(outputs[-2])
        if self.norm is not None:
            outputs[-1] = self.norm(outputs[-1])
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_swin(cfg: SwinConfig, norms: str = "released", final_norm: bool = True) -> VideoSwin:
    return VideoSwin(cfg.shape, cfg.drop_path, cfg.checkpoint, norms, final_norm)


class SwinRecognizer(nn.Module):
    """Video Swin + mean-pooled stage-4 features + linear head (fine-tuning after BEVT)."""

    def __init__(self, encoder: VideoSwin, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dims[-1], num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised clips -> (B, classes) logits."""
        features = self.encoder(clips.transpose(1, 2))[-1]  # (B, T', h, w, C)
        return self.head(self.dropout(features.mean((1, 2, 3))))


# -- checkpoints --------------------------------------------------------------------------------------------

TABLE_SUFFIX = "attn.relative_position_bias_table"
RECOMPUTED = ("relative_position_index", "attn_mask")  # buffers some checkpoints hold; rebuilt here
# what a file may lack by design: the project's extras over Video Swin (RELEASES.md section 3)
EXTRAS = (
    "encoder.mask_token",
    "encoder.patch_embed.proj2d.",
    "encoder.patch_embed.norm2d.",
    "encoder.norm3.",
)
# norms a model of another norm layout (``norms``) has and this one may not: left out, said so
OTHER_LAYOUT = ("encoder.norm3.", "encoder.norm.", "encoder.patch_embed.norm2d.")
# Official Video Swin (mmaction): the encoder under backbone., the classifier as cls_head.fc_cls.
MMACTION_NAMES = {"backbone.": "encoder.", "cls_head.fc_cls.": "head."}
# BEVT's released pretraining checkpoints (mmaction too), named as the release's modules are: its image
# patch embedding and the decoders live in the backbone, its norm is the norm shared by both streams after
# the decoders' linear layers (width = stage 4's), the prediction head is cls_head.lm_head.
BEVT_RELEASE_NAMES = {
    "backbone.patch_embed_2d.proj.": "encoder.patch_embed.proj2d.",
    "backbone.patch_embed_2d.norm.": "encoder.patch_embed.norm2d.",
    "backbone.lm_down.": "decoders.image.fuse.",
    "backbone.fpn.0.": "decoders.image.upsample.",
    "backbone.lm_down_st.0.": "decoders.video.fuse.",
    "backbone.fpn_s.0.": "decoders.video.upsample.",  # a (1, 2, 2) ConvTranspose3d: a 2D one per slot here
    "backbone.fpn_t.0.": "decoders.video.temporal.",
    "backbone.norm.": "decoder_norm.",
    "backbone.": "encoder.",
    "cls_head.lm_head.": "head.",
}
BEVT_TOKENIZER = "cls_head.vae_encoder."  # the release keeps its frozen dVAE encoder in the checkpoint


@dataclass
class _Source:
    """A checkpoint's tensors under this project's names, what kind of file it was, what was left out."""

    kind: str
    state: dict[str, torch.Tensor]
    unused: dict[str, list[str]]  # why -> names of the file's tensors left out
    recomputed: int  # buffers dropped (rebuilt by the model)


def _rename(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        out[key if prefix is None else names[prefix] + key[len(prefix) :]] = value
    return out


def read_checkpoint(state: dict[str, torch.Tensor]) -> _Source:
    """Recognise a Video Swin / Swin / BEVT checkpoint's layout and give its tensors this project's names
    (``encoder.*``, ``decoders.*``, ``decoder_norm.*``, ``head.*``)."""
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    recomputed = [k for k in state if k.rsplit(".", 1)[-1] in RECOMPUTED]
    state = {k: v for k, v in state.items() if k not in recomputed}
    unused: dict[str, list[str]] = {}
    if any(k.startswith("backbone.") for k in state):
        bevt = any(k.startswith(("backbone.patch_embed_2d.", "backbone.lm_down")) for k in state)
        kind = "BEVT release checkpoint" if bevt else "Video Swin (mmaction) checkpoint"
        tokenizer = [k for k in state if k.startswith(BEVT_TOKENIZER)]
        if tokenizer:
            unused["BEVT's frozen dVAE tokenizer"] = tokenizer
        state = _rename(
            {k: v for k, v in state.items() if k not in tokenizer},
            BEVT_RELEASE_NAMES if bevt else MMACTION_NAMES,
        )
        if "encoder.mask_token" in state:  # the release's is (1, 1, C)
            state["encoder.mask_token"] = state["encoder.mask_token"].reshape(-1)
        upsample = state.get("decoders.video.upsample.weight")
        if upsample is not None and upsample.ndim == 5:  # (C, C, 1, 2, 2) -> (C, C, 2, 2)
            state["decoders.video.upsample.weight"] = upsample.squeeze(2)
    elif any(k.startswith("encoder.") for k in state):
        bevt = any(k.startswith(("decoders.", "decoder_norm.")) for k in state)
        kind = f"this project's {'BEVT' if bevt else 'recognition'} run"
    else:  # a bare encoder: Swin 2D (ImageNet), or encoder weights of this project's names
        kernel = state.get("patch_embed.proj.weight")
        kind = "Swin 2D checkpoint" if kernel is not None and kernel.ndim == 4 else "bare encoder weights"
        head = [k for k in state if k.startswith("head.")]
        if head:
            unused["its image classifier"] = head
        state = {f"encoder.{k}": v for k, v in state.items() if k not in head}
    return _Source(kind, state, unused, len(recomputed))


def resize_table(table: torch.Tensor, sides: tuple[int, int]) -> torch.Tensor:
    """A 2D bias table ((2a - 1)^2, heads) resized bicubically to (sides[0] * sides[1], heads)."""
    side = math.isqrt(table.shape[0])
    grid = table.T.reshape(1, table.shape[1], side, side).float()  # (1, heads, 2a - 1, 2a - 1)
    resized = F.interpolate(grid, size=sides, mode="bicubic", align_corners=False)
    return resized.reshape(table.shape[1], -1).T.to(table.dtype)


def inflate_image_weights(
    state: dict[str, torch.Tensor], encoder: VideoSwin, prefix: str = "encoder."
) -> tuple[dict[str, torch.Tensor], str]:
    """Turn image (2D) encoder weights into video ones for ``encoder`` (keys under ``prefix``).

    - A Swin 2D checkpoint's ``patch_embed.proj`` (4-D kernel) and ``patch_embed.norm`` are the image
      stream's: they become ``proj2d`` and (with per-stream norms) also ``norm2d``. Otherwise, with per-stream
      norms, the video stream's norm starts as the image stream's.
    - The 3D patch embedding repeats the 2D kernel over its temporal size and divides by it, so a video of
      one repeated frame gives the image's patch tokens in every temporal slot.
    - Each bias table's temporal-distance-0 plane (a 2D table, resized bicubically when it was made for
      another window, or the slice the image stream trained in a 3D one) is repeated over every temporal
      offset.
    Returns the new state and a few words on what was done.
    """
    state, done = dict(state), []
    p = f"{prefix}patch_embed."
    kernel = state.get(f"{p}proj.weight")
    two_d = kernel is not None and kernel.ndim == 4
    per_stream = encoder.patch_embed.norm2d is not None
    for part in ("weight", "bias"):
        if two_d:
            if f"{p}proj.{part}" in state:
                state[f"{p}proj2d.{part}"] = state.pop(f"{p}proj.{part}")
            if per_stream and f"{p}norm.{part}" in state:
                state[f"{p}norm2d.{part}"] = state[f"{p}norm.{part}"].clone()
        elif per_stream and f"{p}norm2d.{part}" in state:
            state[f"{p}norm.{part}"] = state[f"{p}norm2d.{part}"].clone()
    if per_stream and (two_d or f"{p}norm2d.weight" in state):
        done.append("the image patch norm for both streams")
    frames = encoder.shape.patch[0]
    if f"{p}proj2d.weight" in state:
        state[f"{p}proj.weight"] = state[f"{p}proj2d.weight"].unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
        if f"{p}proj2d.bias" in state:
            state[f"{p}proj.bias"] = state[f"{p}proj2d.bias"].clone()
        done.append(f"patch kernel repeated over {frames} frames / {frames}")
    wt, wh, ww = encoder.shape.window
    plane, resized = (2 * wh - 1) * (2 * ww - 1), set()
    for key, table in list(state.items()):
        if not key.endswith(TABLE_SUFFIX):
            continue
        if two_d:
            side = math.isqrt(table.shape[0])
            if side * side != table.shape[0] or side % 2 == 0:
                continue  # not a 2D table: reported as a shape mismatch
            if side * side != plane:
                table = resize_table(table, (2 * wh - 1, 2 * ww - 1))
                resized.add((side + 1) // 2)
        elif table.shape[0] == (2 * wt - 1) * plane:
            table = table.view(2 * wt - 1, plane, -1)[wt - 1]  # temporal distance 0, the middle plane
        else:
            continue
        state[key] = table.repeat(2 * wt - 1, 1)
    done.append(f"bias tables repeated over {2 * wt - 1} temporal offsets")
    if resized:
        windows = ", ".join(str(w) for w in sorted(resized))
        done.append(f"resized bicubically from window {windows} to {wh}x{ww}")
    return state, ", ".join(done)


def _module(key: str) -> str:
    """What to call a tensor in the load note: its encoder module, or the top-level module outside it."""
    if key.startswith(BEVT_TOKENIZER):
        return BEVT_TOKENIZER.rstrip(".")
    if not key.startswith("encoder."):
        return key.split(".")[0]
    return key.removesuffix(".weight").removesuffix(".bias")


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{', '.join(keys[:limit])}{more}]"


def _other_norm_layouts(state: dict, own: dict) -> tuple[list[str], list[str]]:
    """Map (in place) norms of a file made with the other norm layout onto this model's: an earlier-layout
    run's one patch-embedding norm becomes both streams'; the released BEVT's shared decoder norm becomes a
    recognizer's final norm (as BEVT's release fine-tunes). Returns notes and the prefixes of tensors that
    may then stay fresh."""
    notes, may_be_fresh = [], []
    patch = "encoder.patch_embed."
    if "encoder.norm3.weight" in state and "encoder.norm3.weight" not in own:
        stage4 = ", its stage-4 norm the final norm" if "encoder.norm.weight" in own else ""
        notes.append(f"norms of the earlier layout (bevt.norms: encoder): its stage-3 norm not used{stage4}")
        shared = f"{patch}norm.weight" in state and f"{patch}norm.bias" in state
        if shared and f"{patch}norm2d.weight" in own and f"{patch}norm2d.weight" not in state:
            for part in ("weight", "bias"):
                state[f"{patch}norm2d.{part}"] = state[f"{patch}norm.{part}"].clone()
            notes.append("its one patch-embedding norm initialises both streams'")
    final = "encoder.norm.weight"
    shared = "decoder_norm.weight" in state and "decoder_norm.bias" in state
    if shared and "decoder_norm.weight" not in own and final in own and final not in state:
        if state["decoder_norm.weight"].shape == own[final].shape:
            for part in ("weight", "bias"):
                state[f"encoder.norm.{part}"] = state.pop(f"decoder_norm.{part}")
            notes.append("the final norm from the norm the decoders share (as BEVT's release)")
        else:
            may_be_fresh.append("encoder.norm.")
            width = state["decoder_norm.weight"].shape[0]
            notes.append(
                f"the final norm left fresh: the decoders' shared norm is {width} wide, stage 4 "
                f"{own[final].shape[0]} (bevt.decoder_dim)"
            )
    return notes, may_be_fresh


def load_encoder_weights(model: nn.Module, state: dict[str, torch.Tensor], inflate: bool = False) -> str:
    """Load ``state`` into a model holding a VideoSwin as ``encoder`` (BEVT, SwinRecognizer).

    Reads official Video Swin (mmaction: ``backbone.``, ``cls_head.fc_cls`` -> the recognizer's head),
    Swin 2D (ImageNet; inflated), BEVT's released pretraining checkpoints and this project's runs, of either
    norm layout. Recomputed buffers are dropped; the model's extras (mask token, 2D patch embedding and its
    norm, ``norm3``) and modules outside the encoder (decoders, heads) that the file lacks keep their
    initialisation; a head or decoder of another size or of another task is left out. Anything else missing,
    unexpected or of another shape under ``encoder.`` is one ValueError naming the tensors. Returns a one-line
    account: the file's kind, what was loaded, inflated, left at its initialisation and not used.
    """
    source = read_checkpoint(state)
    state, unused, notes = source.state, source.unused, []
    own = model.state_dict()
    kernel = state.get("encoder.patch_embed.proj.weight")
    if inflate or (kernel is not None and kernel.ndim == 4):
        state, done = inflate_image_weights(state, model.encoder)
        notes.append(f"image weights inflated ({done})")
    layout_notes, may_be_fresh = _other_norm_layouts(state, own)
    notes += layout_notes
    heads = [k for k in state if k.startswith("head.")]
    source_bevt = any(k.startswith(("decoders.", "decoder_norm.")) for k in state)
    if heads and source_bevt != any(k.startswith("decoders.") for k in own):
        # BEVT's prediction head is no classifier, nor the reverse
        unused["the pretraining head" if source_bevt else "its classifier"] = heads
        state = {k: v for k, v in state.items() if k not in heads}

    usable, wrong, unexpected = {}, [], []
    for key, value in state.items():
        if key in own and value.shape == own[key].shape:
            usable[key] = value
        elif key in own and key.startswith("encoder."):
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        elif key in own:
            unused.setdefault("another size than this model's", []).append(key)
        elif key.startswith(OTHER_LAYOUT):
            unused.setdefault("norms this layout does not have", []).append(key)
        elif key.startswith(("decoders.", "decoder_norm.", "head.")):
            unused.setdefault("this model has none", []).append(key)
        else:
            unexpected.append(key)
    optional = (*EXTRAS, *may_be_fresh)
    missing = [k for k in own if k not in state and k.startswith("encoder.") and not k.startswith(optional)]
    if missing or unexpected or wrong:
        problems = [
            f"{what} {_names(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shapes differ at", wrong))
            if keys
        ]
        shape = model.encoder.shape
        raise ValueError(
            f"the weights ({source.kind}) do not fit this encoder (embed {shape.embed_dim}, depths "
            f"{list(shape.depths)}, window {list(shape.window)}): {'; '.join(problems)} "
            "(is swin.name the one the weights were trained with?)"
        )
    model.load_state_dict(usable, strict=False)
    if "head.weight" in usable:
        notes.append(f"head loaded ({usable['head.weight'].shape[0]} outputs)")
    fresh = sorted({_module(k) for k in own if k not in usable})
    left_out = "; ".join(f"{_names({_module(k) for k in keys})} ({why})" for why, keys in unused.items())
    recomputed = f"; {source.recomputed} recomputed buffers dropped" if source.recomputed else ""
    return (
        f"{source.kind}: {len(usable)} tensors loaded; {'; '.join([*notes, ''])}initialised afresh: "
        f"{_names(fresh, 12) if fresh else 'nothing'}; not used: {left_out or 'nothing'}{recomputed}"
    )
