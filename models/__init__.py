"""Models: frozen backbones with taps, and the side networks that learn beside them (no distributed code)."""

from models.backbone import SIZES, BackboneConfig, FrozenViT, build_backbone, select_taps
from models.side4video import Side4Video, SideConfig, count_params, no_weight_decay


def build_side_network(cfg: SideConfig, backbone: FrozenViT) -> Side4Video:
    """A side network shaped to consume ``backbone``'s taps (one side block per tap)."""
    return Side4Video(cfg, backbone.width, backbone.patch_size, backbone.grid, len(backbone.taps))


__all__ = [
    "SIZES",
    "BackboneConfig",
    "FrozenViT",
    "Side4Video",
    "SideConfig",
    "build_backbone",
    "build_side_network",
    "count_params",
    "no_weight_decay",
    "select_taps",
]
