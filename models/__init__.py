"""Models: frozen backbones with taps, and the side networks that learn beside them (no distributed code)."""

from dataclasses import replace

from models.backbone import (
    SIZES,
    BackboneConfig,
    FrozenEVAVision,
    FrozenViT,
    build_backbone,
    meta_backbone,
    select_taps,
)
from models.retrieval import Side4VideoRetrieval, contrastive_loss
from models.side4video import Side4Video, SideConfig, count_params, load_side_weights, no_weight_decay
from models.text import TEXT_SIZES, FrozenCLIPText, TextConfig, build_text_encoder


def backbone_family(backbone: FrozenViT) -> str:
    """ "eva" for an EVA-CLIP tower (post-norm blocks), "clip" otherwise (``side.block: auto`` follows it)."""
    return "eva" if isinstance(backbone, FrozenEVAVision) else "clip"


def build_side_network(cfg: SideConfig, backbone: FrozenViT) -> Side4Video:
    """A side network shaped to consume ``backbone``'s taps (one side block per tap); ``side.block: auto``
    gives the E/14 (post-norm) side block beside an EVA tower and the CLIP one otherwise."""
    shape = backbone.width, backbone.patch_size, backbone.grid, len(backbone.taps)
    return Side4Video(cfg, *shape, family=backbone_family(backbone))


def build_retrieval_network(cfg: SideConfig, backbone: FrozenViT) -> Side4VideoRetrieval:
    """The side network with the retrieval head; its frozen output head is shaped like ``backbone``'s
    (copy the weights in with ``model.output.copy_from(*backbone.output_head())``)."""
    if backbone.taps[-1] != backbone.num_layers - 1:
        raise ValueError(
            f"retrieval adds to the final block's class token: tap block {backbone.num_layers - 1} "
            f"(taps are {backbone.taps})"
        )
    norm, proj = backbone.output_head()
    if proj is None:
        raise ValueError("the backbone was built without its projection (build_backbone(projection=True))")
    embed_dim = getattr(proj.weight, "ds_shape", proj.weight.shape)[0]  # ZeRO-3 keeps the full shape aside
    return Side4VideoRetrieval(
        replace(cfg, block=cfg.block_for(backbone_family(backbone))),
        backbone.width,
        backbone.patch_size,
        backbone.grid,
        len(backbone.taps),
        embed_dim,
        norm.eps,
        proj.bias is not None,
    )


__all__ = [
    "SIZES",
    "TEXT_SIZES",
    "BackboneConfig",
    "FrozenCLIPText",
    "FrozenViT",
    "Side4Video",
    "Side4VideoRetrieval",
    "SideConfig",
    "TextConfig",
    "backbone_family",
    "build_backbone",
    "build_retrieval_network",
    "build_side_network",
    "build_text_encoder",
    "contrastive_loss",
    "count_params",
    "load_side_weights",
    "meta_backbone",
    "no_weight_decay",
    "select_taps",
]
