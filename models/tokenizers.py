"""BEVT's frozen target tokenizers: frames -> a grid of discrete codes the masked model learns to predict.

Two kinds, one interface (``forward(frames (B, 3, H, W) uint8) -> (B, grid, grid) int64``, ``vocab_size``,
``grid``, ``input_size``):

- ``dvae``: OpenAI DALL-E's dVAE encoder (8192 codes on a 112 px copy of each frame -> 14x14), re-implemented
  with the parameter names of ``dall_e/encoder.py`` so ``torch.load("encoder.pkl").state_dict()`` loads as is.
- ``kmeans``: nearest centroid (cosine) of a frozen ViT block's patch tokens, against a codebook fitted on
  video frames by ``python -m launch.fit_tokenizer``.

Like the backbones they are frozen (eval mode, no gradients) and keep every parameter in a submodule whose own
forward uses it, so ZeRO-3 can partition them (``trainer.frozen.place_frozen``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data.video import normalize
from models.backbone import BackboneConfig, FrozenViT, build_backbone, default_dtype
from models.weights import CheckpointReader, load_weights
from trainer.safe_load import CorruptFileError, safe_torch_load

KINDS = ("kmeans", "dvae")
CODEBOOK_KEYS = ("centroids", "backbone", "layer")


@dataclass
class TokenizerConfig:
    """The frozen tokenizer that turns frames into BEVT's target codes."""

    kind: str = "kmeans"
    """"kmeans" (centroids of a frozen ViT's patch features) or "dvae" (DALL-E's dVAE encoder)."""
    path: str | None = None
    """dvae: a state_dict file (.pt/.safetensors) of DALL-E's encoder; kmeans: the codebook file written by
    ``launch.fit_tokenizer``. Required to build either (never downloaded)."""
    input_size: int = 112
    """dvae: pixels per side frames are resized to (a multiple of 8; the grid is input_size / 8)."""
    vocab_size: int = 8192
    """dvae: codes (the encoder's output channels); kmeans takes it from the codebook."""
    eps: float = 0.1
    """dvae: the logit-Laplace pixel mapping's margin, x -> (1 - 2 eps) x + eps."""
    dvae_hidden: int = 256
    """dvae: the encoder's base width n_hid (DALL-E: 256; smaller for tests)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"bevt.tokenizer.kind: {self.kind!r} is not one of {list(KINDS)}")
        if self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"bevt.tokenizer.input_size: {self.input_size} is not a positive multiple of 8")
        if self.vocab_size < 2:
            raise ValueError(f"bevt.tokenizer.vocab_size: must be >= 2, got {self.vocab_size}")
        if not 0 <= self.eps < 0.5:
            raise ValueError(f"bevt.tokenizer.eps: must be within [0, 0.5), got {self.eps}")
        if self.dvae_hidden < 4 or self.dvae_hidden % 4:
            raise ValueError(
                f"bevt.tokenizer.dvae_hidden: must be a positive multiple of 4, got {self.dvae_hidden}"
            )


class FrozenTokenizer(nn.Module):
    """Frozen: stays in eval mode whatever the caller asks, and no parameter takes gradients."""

    vocab_size: int
    grid: int
    input_size: int

    def freeze(self) -> FrozenTokenizer:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenTokenizer:
        return super().train(False)


def resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) floats -> (B, 3, size, size), bilinear and antialiased (a no-op at the size)."""
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --- DALL-E's dVAE encoder -------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """DALL-E's convolution: parameters ``w`` (out, in, k, k) and ``b`` (out,), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=(n_in * kernel**2) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kernel - 1) // 2)


class EncoderBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the residual path narrows to n_out / 4 channels."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(),
                conv_1=Conv2d(n_in, hidden, 3),
                relu_2=nn.ReLU(),
                conv_2=Conv2d(hidden, hidden, 3),
                relu_3=nn.ReLU(),
                conv_3=Conv2d(hidden, hidden, 3),
                relu_4=nn.ReLU(),
                conv_4=Conv2d(hidden, n_out, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """DALL-E's dVAE encoder (``dall_e/encoder.py``): 4 groups of 2 blocks at widths n, 2n, 4n, 8n, a 2x2 max
    pool after each of the first three, then a 1x1 convolution to the vocabulary's logits."""

    def __init__(self, n_hid: int = 256, vocab_size: int = 8192, groups: int = 4, blocks_per_group: int = 2):
        super().__init__()
        n_layers = groups * blocks_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(3, n_hid, 7))
        width = n_hid
        for group in range(groups):
            out = n_hid * 2**group
            stage: OrderedDict[str, nn.Module] = OrderedDict()
            for index in range(blocks_per_group):
                stage[f"block_{index + 1}"] = EncoderBlock(width if index == 0 else out, out, n_layers)
            if group < groups - 1:
                stage["pool"] = nn.MaxPool2d(kernel_size=2)
            layers[f"group_{group + 1}"] = nn.Sequential(stage)
            width = out
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(width, vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) logit-Laplace-mapped pixels -> (B, vocab, S / 8, S / 8) logits."""
        return self.blocks(pixels)


def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """DALL-E's logit-Laplace input mapping: [0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


class DVAETokenizer(FrozenTokenizer):
    """Frames -> argmax of the dVAE encoder's logits on a logit-Laplace-mapped ``input_size`` copy."""

    def __init__(self, encoder: DVAEEncoder, vocab_size: int, input_size: int, eps: float):
        super().__init__()
        self.encoder = encoder
        self.vocab_size, self.input_size, self.eps = vocab_size, input_size, eps
        self.grid = input_size // 8
        self.freeze()

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, input_size / 8, input_size / 8) int64 codes."""
        pixels = resize(frames.float() / 255, self.input_size).clamp_(0, 1)  # (B, 3, S, S)
        logits = self.encoder(map_pixels(pixels, self.eps))  # (B, vocab, S / 8, S / 8)
        return logits.argmax(dim=1)


# --- k-means codebook over a frozen ViT's patch features -------------------------------------------------


def nearest_centroid(
    features: torch.Tensor, centroids: torch.Tensor, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-nearest centroid of each feature vector, a chunk of rows at a time.

    Args:
        features: (N, D); normalised here.
        centroids: (K, D), L2-normalised.
        chunk: rows per chunk (0: enough to keep each similarity block near 16M entries).
    Returns:
        codes (N,) int64 and their cosine similarity (N,) float32.
    """
    chunk = chunk or max(1, 2**24 // len(centroids))
    codes, similarity = [], []
    for rows in features.split(chunk):
        scores = F.normalize(rows.float(), dim=-1) @ centroids.T  # (chunk, K)
        best, index = scores.max(dim=-1)
        codes.append(index)
        similarity.append(best)
    return torch.cat(codes), torch.cat(similarity)


def fit_kmeans(features: torch.Tensor, codes: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means: L2-normalised centroids maximising the cosine to their members.

    k-means++ initialisation (sampling by 1 - cosine), then Lloyd iterations in chunks; a cluster left empty
    is re-seeded with the worst-fitting points. Deterministic from ``seed``.

    Args:
        features: (N, D) vectors, N >= codes.
    Returns:
        (K, D) float32 centroids of unit length.
    """
    if features.ndim != 2:
        raise ValueError(f"fit_kmeans: features must be (N, D), got {tuple(features.shape)}")
    if not 1 <= codes <= len(features):
        raise ValueError(f"fit_kmeans: {codes} codes need 1 to {len(features)} feature vectors")
    generator = torch.Generator().manual_seed(seed)
    points = F.normalize(features.float(), dim=-1)  # (N, D)

    # k-means++: each next centroid drawn with probability proportional to its distance to the chosen ones.
    first = int(torch.randint(len(points), (1,), generator=generator))
    centroids = points.new_empty(codes, points.shape[1])
    centroids[0] = points[first]
    distance = (1 - points @ centroids[0]).clamp_(min=0)  # (N,)
    for k in range(1, codes):
        cumulative = distance.double().cumsum(0).cpu()  # inverse-CDF sampling: far cheaper than multinomial
        if cumulative[-1] <= 0:  # fewer distinct points than codes: any point will do
            cumulative = torch.arange(1, len(points) + 1, dtype=torch.float64)
        target = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
        pick = min(int(torch.searchsorted(cumulative, target, right=True)), len(points) - 1)
        centroids[k] = points[pick]
        distance = torch.minimum(distance, (1 - points @ centroids[k]).clamp_(min=0))

    assigned = None
    for _ in range(iters):
        labels, similarity = nearest_centroid(points, centroids)
        if assigned is not None and torch.equal(labels, assigned):
            break
        assigned = labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # (K, D)
        counts = torch.bincount(labels, minlength=codes)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = similarity.argsort()[: len(empty)]  # the points their centroids fit least
            sums[empty] = points[worst]
        centroids = F.normalize(sums, dim=-1)
    return centroids


class Codebook(nn.Module):
    """The centroids, a buffer used by this module's own forward."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centroids", F.normalize(centroids.float(), dim=-1))  # (K, D)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (...) int64 codes of the cosine-nearest centroid."""
        codes, _ = nearest_centroid(features.reshape(-1, features.shape[-1]), self.centroids)
        return codes.view(features.shape[:-1])


class KMeansTokenizer(FrozenTokenizer):
    """Frames -> the codebook's nearest centroid of each patch token of one frozen ViT block."""

    def __init__(self, backbone: FrozenViT, codebook: Codebook):
        super().__init__()
        self.backbone, self.codebook = backbone, codebook
        self.vocab_size = codebook.centroids.shape[0]
        self.input_size, self.grid = backbone.image_size, backbone.grid
        self.layer = backbone.taps[-1]
        self.freeze()

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, grid, grid) int64 codes."""
        pixels = normalize(resize(frames.float(), self.input_size), self.backbone.dtype)
        for hidden in self.backbone(pixels):  # the backbone stops at its one tap
            tokens = hidden[:, 1:]  # (B, N, width): the patch tokens
        return self.codebook(tokens).view(-1, self.grid, self.grid)


def read_codebook(path: str | Path) -> dict:
    """The codebook file ``launch.fit_tokenizer`` writes, checked."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"bevt.tokenizer.path: {path} does not exist; fit one with python -m launch.fit_tokenizer"
        )
    try:  # weights_only: a file whose pickle holds more than tensors raises UnsafeFileError (never run)
        stored = safe_torch_load(path, "bevt.tokenizer.path", mmap=True)
    except CorruptFileError as exc:  # not a torch file at all
        raise ValueError(f"bevt.tokenizer.path: {path} is not a codebook file ({exc.why})") from None
    if not isinstance(stored, dict) or any(key not in stored for key in CODEBOOK_KEYS):
        found = sorted(stored)[:8] if isinstance(stored, dict) else type(stored).__name__
        raise ValueError(
            f"bevt.tokenizer.path: {path} is not a codebook written by launch.fit_tokenizer "
            f"(needs {list(CODEBOOK_KEYS)}, found {found})"
        )
    centroids = stored["centroids"]
    if not isinstance(centroids, torch.Tensor) or centroids.ndim != 2:
        raise ValueError(f"bevt.tokenizer.path: {path}: centroids must be a (K, D) tensor")
    return stored


def save_codebook(
    path: str | Path,
    centroids: torch.Tensor,
    backbone: BackboneConfig,
    layer: int,
    weights: dict[str, torch.Tensor] | None = None,
    **extra,
) -> None:
    """Write a codebook file: the centroids and the backbone that produced the features.

    Args:
        weights: the backbone's parameters by name, stored under "state_dict" when it has no pretrained
            weights to rebuild it from (random weights are not reproducible; the codes must mean the same).
        extra: provenance (source, samples, ...).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    record = {"centroids": centroids.float().cpu(), "backbone": dataclasses.asdict(backbone), "layer": layer}
    if weights is not None:
        record["state_dict"] = {name: tensor.detach().cpu() for name, tensor in weights.items()}
    torch.save({**extra, **record}, path)


# --- building ----------------------------------------------------------------------------------------------


def build_tokenizer(
    cfg: TokenizerConfig,
    construct: Callable[[], AbstractContextManager] = nullcontext,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
    writer: bool = True,
    load: bool = True,
) -> FrozenTokenizer:
    """Build the frozen tokenizer and load its weights one piece at a time.

    ``construct``/``gather``/``writer`` as in ``build_backbone`` (a ``trainer.frozen.Builder``);
    ``load=False`` builds the shape without reading the weights (a codebook file still gives its shape).
    """
    if cfg.path is None:
        how = (
            "save the state_dict of OpenAI DALL-E's encoder, "
            "torch.save(torch.load('encoder.pkl').state_dict(), 'dvae_encoder.pt'), and point it there"
            if cfg.kind == "dvae"
            else "fit a codebook with python -m launch.fit_tokenizer and point it at the file"
        )
        raise ValueError(f"bevt.tokenizer.path: the {cfg.kind} tokenizer needs weights; {how}")
    if cfg.kind == "dvae":
        if not Path(cfg.path).is_file():
            raise FileNotFoundError(f"bevt.tokenizer.path: {cfg.path} does not exist")
        with (
            default_dtype(torch.float32),
            construct(),
        ):  # DALL-E's float32 logits, whatever the caller's default
            encoder = DVAEEncoder(cfg.dvae_hidden, cfg.vocab_size)
        if load:
            reader = CheckpointReader(cfg.path, "bevt.tokenizer.path")
            load_weights(encoder, reader, ("",), gather=gather, writer=writer)
        return DVAETokenizer(encoder, cfg.vocab_size, cfg.input_size, cfg.eps)

    stored = read_codebook(cfg.path)
    layer = int(stored["layer"])
    backbone_cfg = BackboneConfig(**{**stored["backbone"], "tap_every": 0, "tap_layers": [layer]})
    if not load:
        backbone_cfg = dataclasses.replace(backbone_cfg, pretrained=None)
    backbone = build_backbone(backbone_cfg, construct, gather, writer)
    if load and "state_dict" in stored:  # the random weights the codebook was fitted with, by module name
        reader = CheckpointReader(cfg.path, "bevt.tokenizer.path")
        load_weights(backbone, reader, ("",), gather=gather, writer=writer)
    if stored["centroids"].shape[1] != backbone.width:
        raise ValueError(
            f"bevt.tokenizer.path: {cfg.path}: {stored['centroids'].shape[1]}-d centroids for a "
            f"{backbone.width}-wide backbone"
        )
    with construct():  # buffers created here follow the construct context's device
        codebook = Codebook(stored["centroids"])
    return KMeansTokenizer(backbone, codebook)
