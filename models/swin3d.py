"""Video Swin Transformer with an image stream that shares every weight but the patch embedding (BEVT).

One encoder, two inputs:
- video (B, 3, T, H, W): a 3D patch embedding (Conv3d, stride (2, 4, 4) at Swin-B) and 3D windows (8, 7, 7);
- images (B, 3, H, W): a 2D patch embedding (Conv2d, stride 4) and 2D windows (7, 7), i.e. a video of one
  temporal slot. A window never exceeds its input (Video Swin's rule: a dimension no larger than the window is
  attended whole and not shifted), so images get windows (1, 7, 7) and shift (0, 3, 3).
Every block, patch merging, norm and the mask token are shared. The relative-position-bias table is 3D,
(2Wt - 1)(2Wh - 1)(2Ww - 1) x heads, and is always indexed with the table's own strides: a window of one slot
reads exactly the temporal-distance-0 slice, which is what the image stream uses.

Parameter names follow Swin / Video Swin (``patch_embed.proj``, ``layers.i.blocks.j.attn.qkv``,
``layers.i.downsample.reduction``, ``norm``), so ``inflate_image_weights`` can take a 2D Swin checkpoint.
Models here hold no distributed code.
"""

from __future__ import annotations

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


# "base" is BEVT's Swin-B; "demo" is what the CPU demos pretrain; "test" is for unit tests.
SWIN_SIZES: dict[str, SwinShape] = {
    "base": SwinShape(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "small": SwinShape(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "tiny": SwinShape(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "demo": SwinShape(48, (1, 1, 2, 1), (2, 4, 8, 16), window=(4, 3, 3), mlp_ratio=2.0),
    "test": SwinShape(16, (1, 1, 2, 1), (1, 2, 2, 4), window=(2, 4, 4), mlp_ratio=2.0),
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
    """Initial weights: a run directory (its latest checkpoint) or a state-dict file, of a BEVT run, a
    recognizer, or a bare encoder (2D Swin checkpoints are inflated). Modules the file lacks (a new decoder
    or head) keep their initialisation and are named in the log."""
    inflate: bool = False
    """Treat ``init_from`` as image weights: inflate its image patch embedding and the temporal-distance-0
    slice of its bias tables to 3D (BEVT stage 2 from the image-only stage 1)."""
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
    """The two streams' patch embeddings (the only unshared weights) and a shared norm."""

    def __init__(self, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(3, dim, patch, patch)  # video
        self.proj2d = nn.Conv2d(3, dim, patch[1:], patch[1:])  # images
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) video or (B, 3, H, W) images -> (B, T', H', W', C); images have T' = 1."""
        out = self.proj(x) if x.ndim == 5 else self.proj2d(x).unsqueeze(2)
        return self.norm(out.permute(0, 2, 3, 4, 1))


class VideoSwin(nn.Module):
    """The shared encoder. ``forward`` returns every stage's output (stage 3 and 4 normed)."""

    def __init__(self, shape: SwinShape, drop_path: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.shape, self.use_checkpoint = shape, use_checkpoint
        dims = [shape.embed_dim * 2**i for i in range(len(shape.depths))]
        self.dims = dims
        self.patch_embed = PatchEmbed(dims[0], shape.patch)
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
        self.norm3 = nn.LayerNorm(dims[-2])  # the decoders' stage-3 input
        self.norm = nn.LayerNorm(dims[-1])
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
            per stage (B, T', H_i, W_i, C_i) with H_i = H / (4 * 2^i); the last two normed.
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
        outputs[-2], outputs[-1] = self.norm3(outputs[-2]), self.norm(outputs[-1])
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_swin(cfg: SwinConfig) -> VideoSwin:
    return VideoSwin(cfg.shape, cfg.drop_path, cfg.checkpoint)


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


# -- inflation ----------------------------------------------------------------------------------------------

TABLE_SUFFIX = "attn.relative_position_bias_table"


def inflate_image_weights(state: dict[str, torch.Tensor], model: VideoSwin, prefix: str = "") -> dict:
    """Turn image (2D) encoder weights into video ones for ``model`` (keys under ``prefix``).

    - The 3D patch embedding repeats the 2D kernel over its temporal size and divides by it, so a video of
      one repeated frame gives the image's patch tokens in every temporal slot. A 2D Swin checkpoint's
      ``patch_embed.proj`` (4-D kernel) also becomes the image stream's ``proj2d``.
    - Each bias table's temporal-distance-0 slice (a 2D table, or the slice the image stream trained in a
      3D one) is repeated over every temporal offset.
    Tensors the model does not have (Swin's ``relative_position_index``, ``attn_mask``) are dropped.
    """
    target = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    out = {k: v for k, v in state.items() if k in target}
    proj, proj2d = f"{prefix}patch_embed.proj", f"{prefix}patch_embed.proj2d"
    if f"{proj}.weight" in state and state[f"{proj}.weight"].ndim == 4:  # a 2D Swin checkpoint
        out[f"{proj2d}.weight"], out[f"{proj2d}.bias"] = state[f"{proj}.weight"], state[f"{proj}.bias"]
    if f"{proj2d}.weight" in out:
        kernel = out[f"{proj2d}.weight"]  # (C, 3, ph, pw)
        frames = model.shape.patch[0]
        out[f"{proj}.weight"] = kernel.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
        out[f"{proj}.bias"] = out[f"{proj2d}.bias"].clone()
    wt, wh, ww = model.shape.window
    plane = (2 * wh - 1) * (2 * ww - 1)
    for key, value in state.items():
        if not key.endswith(TABLE_SUFFIX) or key not in target:
            continue
        if value.shape[0] == plane:
            slice0 = value
        else:  # a 3D table: (2Wt - 1) planes, temporal distance 0 in the middle
            slice0 = value.view(2 * wt - 1, plane, -1)[wt - 1]
        out[key] = slice0.repeat(2 * wt - 1, 1)
    return out


def load_encoder_weights(model: nn.Module, state: dict[str, torch.Tensor], inflate: bool = False) -> str:
    """Load ``state`` into a model holding a VideoSwin as ``encoder`` (BEVT, SwinRecognizer).

    Keys are matched as they are, or, for a bare encoder's weights, under ``encoder.``. Everything under
    ``encoder.`` must match; other keys (another task's decoders or head) load where shapes agree. Returns a
    one-line account: what was loaded, inflated, left at its initialisation and dropped.
    """
    if not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    encoder = model.encoder
    inflate = inflate or state.get("encoder.patch_embed.proj.weight", torch.empty(0, 0, 0, 0, 0)).ndim == 4
    if inflate:
        inflated = inflate_image_weights(state, encoder, "encoder.")
        state = {**{k: v for k, v in state.items() if not k.startswith("encoder.")}, **inflated}
    own = model.state_dict()
    fits = {k: k in own and v.shape == own[k].shape for k, v in state.items()}
    wrong = [k for k, ok in fits.items() if k.startswith("encoder.") and not ok]
    missing = [k for k in own if k.startswith("encoder.") and k not in state]
    if wrong or missing:
        raise ValueError(
            f"the weights do not fit this {encoder.shape} encoder: shapes differ at {wrong[:5]}, missing "
            f"{missing[:5]} (is swin.name the one the weights were trained with?)"
        )
    usable = {k: v for k, v in state.items() if fits[k]}  # another task's head of another size is left out
    model.load_state_dict(usable, strict=False)
    fresh = sorted({k.rsplit(".", 1)[0] for k in own if k not in usable})
    dropped = sorted({k.split(".")[0] for k in state if not fits[k]})
    return (
        f"{len(usable)} tensors loaded{' (image weights inflated)' if inflate else ''}; "
        f"initialised afresh: {fresh or 'nothing'}; not used: {dropped or 'nothing'}"
    )
