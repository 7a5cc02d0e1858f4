"""Models: frozen backbones with taps, and the side networks that learn beside them (no distributed code)."""

from models.backbone import SIZES, BackboneConfig, FrozenViT, build_backbone, meta_backbone, select_taps
from models.retrieval import Side4VideoRetrieval, contrastive_loss
from models.side4video import Side4Video, SideConfig, count_params, no_weight_decay
from models.text import TEXT_SIZES, FrozenCLIPText, TextConfig, build_text_encoder


def build_side_network(cfg: SideConfig, backbone: FrozenViT) -> Side4Video:
    """A side network shaped to consume ``backbone``'s taps (one side block per tap)."""
    return Side4Video(cfg, backbone.width, backbone.patch_size, backbone.grid, len(backbone.taps))


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
        cfg,
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
    "build_backbone",
    "build_retrieval_network",
    "build_side_network",
    "build_text_encoder",
    "contrastive_loss",
    "count_params",
    "meta_backbone",
    "no_weight_decay",
    "select_taps",
]
