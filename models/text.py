"""The frozen CLIP text encoder for retrieval: token states projected into the joint embedding space.

Like the vision backbone it is always frozen (eval mode, no gradients) and keeps every parameter in a
submodule whose own forward uses it, so ZeRO-3 can partition it. Weights come from a local transformers CLIP
directory (a whole ``CLIPModel`` or a ``CLIPTextModelWithProjection``), read piece by piece; never
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from models.backbone import DTYPES, default_dtype
from models.weights import CheckpointReader, load_weights


@dataclass(frozen=True)
class TextShape:
    width: int
    depth: int
    heads: int
    mlp: int


# OpenAI CLIP B and L text towers, EVA02-CLIP-bigE-14's; "demo" and "tiny" for the CPU demo and tests.
TEXT_SIZES: dict[str, TextShape] = {
    "clip-b": TextShape(512, 12, 8, 2048),
    "clip-l": TextShape(768, 12, 12, 3072),
    "eva-e": TextShape(1280, 32, 20, 5120),
    "demo": TextShape(128, 2, 4, 512),
    "tiny": TextShape(32, 1, 2, 64),
}


@dataclass
class TextConfig:
    """The frozen text encoder (retrieval only)."""

    name: str = "demo"
    """Named shape (see TEXT_SIZES); ignored when ``pretrained`` is a transformers directory."""
    pretrained: str | None = None
    """A local transformers CLIP directory (CLIPModel or CLIPTextModelWithProjection). None keeps random
    weights."""
    dtype: str = "float32"
    """Dtype of the frozen weights and of the token states handed over."""
    random_token_std: float = 0.0
    """Without ``pretrained``: the std of the random token embeddings (0: CLIP's init, 0.02). At CLIP's init
    the position embeddings and the mixing of the prefix dominate, so the same word in two captions is less
    alike than two words at one position; a std of 1 makes a random encoder keep words apart, a stand-in for
    a trained one in the CPU demo and tests."""

    def __post_init__(self):
        if self.name not in TEXT_SIZES:
            raise ValueError(f"text.name: unknown size {self.name!r}; known: {sorted(TEXT_SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"text.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.random_token_std < 0:
            raise ValueError(f"text.random_token_std must be >= 0, got {self.random_token_std}")


class FrozenCLIPText(nn.Module):
    """transformers' CLIP text tower and its projection, frozen. Parameter names match a CLIPModel's."""

    def __init__(self, model: CLIPTextModelWithProjection):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.embed_dim = model.config.projection_dim
        self.vocab_size = model.config.vocab_size
        self.max_positions = model.config.max_position_embeddings
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenCLIPText:
        return super().train(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> (B, L, E) projected token states (after the final norm), without autograd."""
        states = self.text_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, width)
        return self.text_projection(states)


def build_text_encoder(
    cfg: TextConfig,
    embed_dim: int,
    vocab_size: int,
    construct: Callable[[], AbstractContextManager] = nullcontext,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
    writer: bool = True,
    load: bool = True,
) -> FrozenCLIPText:
    """Build the frozen text encoder projecting to ``embed_dim`` (the vision side's) and load its weights.

    ``vocab_size`` (the tokenizer's, start and end tokens last as in CLIP) sizes a random-weight model's
    embedding table; a pretrained one must be at least as large. ``construct``/``gather``/``writer`` as in
    ``build_backbone``; ``load=False`` builds a pretrained model's shape without reading its weights.
    """
    if cfg.pretrained is not None:
        if not Path(cfg.pretrained).is_dir():
            raise FileNotFoundError(f"text.pretrained: {cfg.pretrained} is not a transformers directory")
        config = CLIPTextConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        # A whole CLIPModel keeps the projection size at its top level, outside the text config.
        top = json.loads((Path(cfg.pretrained) / "config.json").read_text())
        config.projection_dim = top.get("projection_dim", config.projection_dim)
        if config.projection_dim != embed_dim:
            raise ValueError(
                f"text.pretrained: projects to {config.projection_dim}, the vision side to {embed_dim}"
            )
        if config.vocab_size < vocab_size:
            raise ValueError(
                f"text.pretrained: {config.vocab_size} token embeddings for a tokenizer of {vocab_size}"
            )
    else:
        s = TEXT_SIZES[cfg.name]
        config = CLIPTextConfig(
            hidden_size=s.width,
            num_hidden_layers=s.depth,
            num_attention_heads=s.heads,
            intermediate_size=s.mlp,
            projection_dim=embed_dim,
            vocab_size=vocab_size,
            # CLIP's layout, which write_bpe_tokenizer keeps: the start and end tokens come last
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    config._attn_implementation = "sdpa"
    with default_dtype(DTYPES[cfg.dtype]), construct():
        model = FrozenCLIPText(CLIPTextModelWithProjection(config))
    if cfg.pretrained is None and cfg.random_token_std:
        table = model.text_model.embeddings.token_embedding.weight
        with (gather or (lambda params: nullcontext()))([table]):
            if writer:
                table.data.normal_(0, cfg.random_token_std)
    if cfg.pretrained is not None and load:
        # Keys under "text_model." plus "text_projection.weight"; a CLIPModel's vision keys are left alone.
        load_weights(
            model,
            CheckpointReader(cfg.pretrained),
            ("text_model.", ""),
            gather=gather,
            writer=writer,
            rename=lambda name: name.removeprefix("text_model."),
        )
    return model
