"""Convert checkpoints into the safetensors files a run starts from, reading memory-mapped sources.

A vision tower out of a CLIP checkpoint (keys under --prefix, default "visual.", kept with the prefix
removed; the text tower and the logit scale are dropped):

    python -m launch.convert_checkpoint --src EVA02_CLIP_E_psz14_s4B.pt --out checkpoints/vit-e14.safetensors

A released Side4Video recognition model (a Model Zoo file, RELEASES.md section 1):

    python -m launch.convert_checkpoint --side4video MODEL.pt --config configs/ssv2_vitb16.yaml --out DIR

writes DIR/backbone.safetensors, the frozen tower under the names the project's loader reads (set
``backbone.pretrained`` to it), and DIR/side.safetensors, the side network and classifier with their
BatchNorm running statistics (set ``side.init_from`` to it or to DIR). The config (and any ``key=value``
overrides after it) gives the shapes the release must fit: the backbone, ``side.width``,
``side.num_classes``, ``side.block`` and ``side.pos_embed``. Names are mapped by the tables below; every
tensor must be used and every project tensor filled, or nothing is written. The optimizer state is not
converted.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import FrozenViT, Side4Video, backbone_family, build_side_network, meta_backbone
from models.backbone import _clip_rename
from models.eva_vit import EVA_RENAMES
from models.weights import CheckpointReader
from trainer.config import RunConfig, load_config
from trainer.safe_load import UnsafeFileError, safe_torch_load


def convert(src: str | Path, out: str | Path, prefix: str = "visual.") -> int:
    reader = CheckpointReader(src, "--src")  # weights_only: a pickle holding more than weights is refused
    keys = [k for k in reader.names() if k.startswith(prefix)]
    if not keys:
        raise KeyError(f"{src}: no key starts with {prefix!r} (first keys: {reader.names()[:5]})")
    # Memory-mapped tensors: the writer pulls each from the page cache as it serialises it.
    tensors = {k[len(prefix) :]: reader.get(k).contiguous() for k in keys}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"source": Path(src).name, "prefix": prefix})
    return len(tensors)


# -- Side4Video releases: name tables ------------------------------------------------------------------------
# Each rule: (release name after the module./model. prefixes, as a regex; the project's name, with \1, \2,
# ... from the match; what happens to the tensor).
COPY = "copy"
RESHAPE = "reshape"  # to the project's shape, same elements: Conv3d 1x1x1 / (3, 1, 1) -> Linear / Conv1d
TRANSPOSE = "transpose"
SPLIT_QKV = "split q, k, v"  # (3n, ...) -> three (n, ...) at {qkv} = q, k, v
PART_QKV = "q, k or v part"  # three (n, ...) stacked in q, k, v order into one (3n, ...)
Rule = tuple[str, str, str]

_RESBLOCK = r"visual\.transformer\.resblocks\.(\d+)"
_LAYER = r"vision_model.encoder.layers.\1"
# OpenAI CLIP's tower -> transformers' CLIPVisionModel names (what models/backbone.py loads).
CLIP_TOWER: list[Rule] = [
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight", COPY),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding", COPY),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight", COPY),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1", COPY),
    (rf"{_RESBLOCK}\.ln_1\.(weight|bias)", rf"{_LAYER}.layer_norm1.\2", COPY),
    (rf"{_RESBLOCK}\.attn\.in_proj_(weight|bias)", rf"{_LAYER}.self_attn.{{qkv}}_proj.\2", SPLIT_QKV),
    (rf"{_RESBLOCK}\.attn\.out_proj\.(weight|bias)", rf"{_LAYER}.self_attn.out_proj.\2", COPY),
    (rf"{_RESBLOCK}\.ln_2\.(weight|bias)", rf"{_LAYER}.layer_norm2.\2", COPY),
    (rf"{_RESBLOCK}\.mlp\.c_fc\.(weight|bias)", rf"{_LAYER}.mlp.fc1.\2", COPY),
    (rf"{_RESBLOCK}\.mlp\.c_proj\.(weight|bias)", rf"{_LAYER}.mlp.fc2.\2", COPY),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1", COPY),
    (r"visual\.proj", "visual_projection.weight", TRANSPOSE),  # (W, E) -> (E, W), loaded for retrieval only
]
# EVA-CLIP's tower: the release's names are the ones models/eva_vit.py loads.
EVA_TOWER: list[Rule] = [
    (r"visual\.(patch_embed\.proj\.(weight|bias)|cls_token|pos_embed)", r"\1", COPY),
    (r"visual\.(blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc[12])\.(weight|bias))", r"\1", COPY),
    (r"visual\.(blocks\.\d+\.attn\.(q_bias|v_bias))", r"\1", COPY),
    (r"visual\.((norm|head)\.(weight|bias))", r"\1", COPY),
]
# Tower tensors the recognition model does not compute with (kept: the tower's loader wants them whole).
UNUSED_FOR_RECOGNITION = {"clip": ("visual.ln_post.", "visual.proj"), "eva": ("visual.head.",)}

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_CLIP_SIDE = r"visual\.transformer\.side_transformer\.(\d+)"
# The B/16 and L/14 side network (pre-norm blocks) -> models/side4video.py (side.block: clip).
SIDE_CLIP: list[Rule] = [
    (r"visual\.side_conv1\.(weight|bias)", r"stem.\1", COPY),
    (rf"visual\.side_pre_bn3d\.{_BN}", r"stem_norm.\1", COPY),
    (r"visual\.transformer\.side_spatial_position_embeddings", "pos_embed", COPY),  # (N, d), shared
    (r"visual\.transformer\.side_lns\.(\d+)\.(weight|bias)", r"blocks.\1.fusion.norm.\2", COPY),
    (r"visual\.transformer\.side_linears\.(\d+)\.(weight|bias)", r"blocks.\1.fusion.proj.\2", COPY),
    (rf"{_CLIP_SIDE}\.bn_1\.{_BN}", r"blocks.\1.temporal.norm.\2", COPY),
    # Conv3d (d, d, 1, 1, 1) -> Linear (d, d); depthwise (d, 1, 3, 1, 1) over time -> Conv1d (d, 1, 3)
    (rf"{_CLIP_SIDE}\.conv\.0\.(weight|bias)", r"blocks.\1.temporal.pw_in.\2", RESHAPE),
    (rf"{_CLIP_SIDE}\.conv\.1\.(weight|bias)", r"blocks.\1.temporal.depthwise.\2", RESHAPE),
    (rf"{_CLIP_SIDE}\.conv\.2\.(weight|bias)", r"blocks.\1.temporal.pw_out.\2", RESHAPE),
    (rf"{_CLIP_SIDE}\.ln_1\.(weight|bias)", r"blocks.\1.attn_norm.\2", COPY),
    (rf"{_CLIP_SIDE}\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.in_proj.\2", COPY),  # q, k, v stacked
    (rf"{_CLIP_SIDE}\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.out_proj.\2", COPY),
    (rf"{_CLIP_SIDE}\.bn_2\.{_BN}", r"blocks.\1.mlp.norm.\2", COPY),
    (rf"{_CLIP_SIDE}\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3", COPY),
    (rf"visual\.side_post_bn\.{_BN}", r"norm.\1", COPY),
    (r"fc\.(weight|bias)", r"head.\1", COPY),
]
_EVA_SIDE = r"visual\.side_blocks\.(\d+)"
# The E/14 side network (post-norm blocks) -> models/side4video.py (side.block: eva).
SIDE_EVA: list[Rule] = [
    (r"visual\.side_conv1\.(weight|bias)", r"stem.\1", COPY),
    (rf"visual\.side_pre_bn3d\.{_BN}", r"stem_norm.\1", COPY),
    (r"visual\.side_spatial_position_embeddings", "pos_embed", COPY),  # (N, d), shared
    (r"visual\.side_linears\.(\d+)\.(weight|bias)", r"blocks.\1.fusion.proj.\2", COPY),  # Linear(W -> d)
    (r"visual\.side_lns\.(\d+)\.(weight|bias)", r"blocks.\1.fusion.norm.\2", COPY),  # then LayerNorm(d)
    (rf"{_EVA_SIDE}\.conv\.0\.(weight|bias)", r"blocks.\1.temporal.pw_in.\2", RESHAPE),
    (rf"{_EVA_SIDE}\.conv\.1\.(weight|bias)", r"blocks.\1.temporal.depthwise.\2", RESHAPE),
    (rf"{_EVA_SIDE}\.conv\.2\.(weight|bias)", r"blocks.\1.temporal.pw_out.\2", RESHAPE),
    (rf"{_EVA_SIDE}\.bn_1\.{_BN}", r"blocks.\1.temporal.norm.\2", COPY),  # after the conv
    (rf"{_EVA_SIDE}\.attn\.(?P<qkv>[qkv])_proj\.(weight|bias)", r"blocks.\1.attn.in_proj.\3", PART_QKV),
    (rf"{_EVA_SIDE}\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.out_proj.\2", COPY),
    (rf"{_EVA_SIDE}\.ln_1\.(weight|bias)", r"blocks.\1.attn_norm.\2", COPY),  # after the attention
    (rf"{_EVA_SIDE}\.bn_2\.{_BN}", r"blocks.\1.mlp.norm.\2", COPY),  # after the MLP
    (rf"{_EVA_SIDE}\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", COPY),
    (rf"{_EVA_SIDE}\.mlp\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", COPY),
    (r"fc\.(weight|bias)", r"head.\1", COPY),
]
SIDE_RULES = {"clip": SIDE_CLIP, "eva": SIDE_EVA}
TOWER_RULES = {"clip": CLIP_TOWER, "eva": EVA_TOWER}


@dataclass
class Mapped:
    """Tensors under the project's names, the release names each came from, what matched no rule."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    reshape: set[str] = field(default_factory=set)
    unmatched: dict[str, torch.Tensor] = field(default_factory=dict)


def map_names(state: dict[str, torch.Tensor], rules: list[Rule]) -> Mapped:
    """Apply the first rule whose pattern matches the whole name to every tensor of ``state``."""
    mapped, parts = Mapped(), {}
    for key, tensor in state.items():
        for pattern, template, how in rules:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            name = match.expand(template)
            if how == SPLIT_QKV:
                for letter, part in zip("qkv", tensor.chunk(3), strict=True):
                    _put(mapped, name.replace("{qkv}", letter), part.clone(), key)
            elif how == PART_QKV:
                parts.setdefault(name, {})[match["qkv"]] = tensor
                mapped.sources.setdefault(name, []).append(key)
            else:
                _put(mapped, name, tensor.t().contiguous() if how == TRANSPOSE else tensor, key)
                if how == RESHAPE:
                    mapped.reshape.add(name)
            break
        else:
            mapped.unmatched[key] = tensor
    for name, pieces in parts.items():
        if sorted(pieces) != ["k", "q", "v"]:
            raise ValueError(f"{name}: the release holds only the {sorted(pieces)} parts of q, k, v")
        mapped.tensors[name] = torch.cat([pieces[letter] for letter in "qkv"])
    return mapped


def _put(mapped: Mapped, name: str, tensor: torch.Tensor, source: str) -> None:
    if name in mapped.tensors:
        raise ValueError(f"{source} and {mapped.sources[name]} both map to {name}")
    mapped.tensors[name], mapped.sources[name] = tensor, [source]


def _fit_error(what: str, tensors: dict, expected: dict, optional: set[str] = frozenset()) -> str | None:
    """The mismatches between ``tensors`` and the ``expected`` shapes, as one message (None: they fit)."""
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys() - optional)
    mismatched = [
        f"{name} {tuple(tensors[name].shape)} != {tuple(shape)}"
        for name, shape in expected.items()
        if name in tensors and tensors[name].shape != shape
    ]
    if not (missing or unexpected or mismatched):
        return None
    return (
        f"the release does not fit the {what}: {len(missing)} missing {missing}, {len(unexpected)} "
        f"unexpected {unexpected}, {len(mismatched)} of another shape {mismatched}"
    )


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The model state of a Model Zoo file, its ``module.`` / ``model.`` prefixes stripped, and its epoch.
    Loaded memory-mapped where the file allows it, and with ``weights_only`` (no code runs)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    loaded = safe_torch_load(path, "--side4video", mmap=True)  # legacy (non-zip) files are read whole
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model_state_dict"), dict):
        found = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"{path} is not a Side4Video Model Zoo file (no 'model_state_dict'; found {found})")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in loaded["model_state_dict"].items():
        name = key
        while name.startswith(("module.", "model.")):
            name = name.split(".", 1)[1]
        if name in state:
            raise ValueError(f"{path}: two tensors are named {name} once their prefixes are stripped")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {key} is a {type(tensor).__name__}, not a tensor")
        state[name] = tensor
    return state, loaded.get("epoch")


@dataclass
class ReleaseAccount:
    """What a release conversion did."""

    tensors: int  # input tensors, every one mapped
    frozen: int  # frozen parameters the recognition backbone loads
    side: int  # side network + classifier parameters
    buffers: int  # BatchNorm running statistics and batch counters
    epoch: int | None
    unused_for_recognition: list[str]  # release names kept in backbone.safetensors but not computed with
    filled: list[str]  # tower tensors the release lacks that the loader needs (unused for recognition)

    def line(self, out: Path) -> str:
        kept = f"; kept, unused for recognition: {', '.join(self.unused_for_recognition)}"
        filled = f"; filled (absent, unused for recognition): {', '.join(self.filled)}" if self.filled else ""
        return (
            f"mapped {self.tensors} tensors (release epoch {self.epoch}): {self.frozen:,} frozen parameters "
            f"-> {out / 'backbone.safetensors'}, side network + classifier {self.side:,} parameters "
            f"(+ {self.buffers} BatchNorm statistics tensors) -> {out / 'side.safetensors'}"
            f"{kept if self.unused_for_recognition else ''}{filled}; optimizer state not converted"
        )


def map_release(
    state: dict[str, torch.Tensor], backbone: FrozenViT, side_network: Side4Video
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """A release's tensors under the project's names: (side network + classifier, frozen tower, the tower
    tensors filled in because the release lacks them). ``backbone`` and ``side_network`` (meta is enough)
    give the names and shapes.

    Raises:
        ValueError: a tensor fits no rule, or the mapped tensors do not fit (missing, unexpected or
            mismatched names, listed at once).
    """
    family, block = backbone_family(backbone), side_network.block
    side = map_names(state, SIDE_RULES[block])
    tower = map_names(side.unmatched, TOWER_RULES[family])
    if tower.unmatched:
        raise ValueError(
            f"{len(tower.unmatched)} tensors fit no name of the {family} tower or the {block} side network "
            f"(side.block): {sorted(tower.unmatched)}"
        )

    expected_side = {name: t.shape for name, t in side_network.state_dict().items()}
    for name in side.reshape & expected_side.keys():
        if side.tensors[name].numel() == expected_side[name].numel():
            side.tensors[name] = side.tensors[name].reshape(expected_side[name])
    problem = _fit_error(f"{block} side network (side.*)", side.tensors, expected_side)
    if problem:
        raise ValueError(problem)

    if family == "clip":
        expected_tower = {f"vision_model.{_clip_rename(n)}": p.shape for n, p in backbone.named_parameters()}
        optional, fillable = {"visual_projection.weight"}, "vision_model.post_layernorm."
    else:
        expected_tower = {EVA_RENAMES.get(n, n): p.shape for n, p in backbone.named_parameters()}
        optional, fillable = set(), "head."
    filled = []
    for name, shape in expected_tower.items():
        if name.startswith(fillable) and name not in tower.tensors:
            # The loader builds the tower whole; the final norm / head do not take part in recognition.
            identity = name.endswith("weight") and family == "clip"
            tower.tensors[name] = torch.ones(shape) if identity else torch.zeros(shape)
            filled.append(name)
    problem = _fit_error(f"{family} tower (backbone.*)", tower.tensors, expected_tower, optional)
    if problem:
        raise ValueError(problem)
    return side.tensors, tower.tensors, filled


def convert_release(src: str | Path, cfg: RunConfig, out: str | Path) -> ReleaseAccount:
    """Map a Side4Video Model Zoo file onto the backbone and side network ``cfg`` describes
    (``map_release``); write ``out/backbone.safetensors`` and ``out/side.safetensors``.

    Raises:
        ValueError: the release does not fit (see ``map_release``); nothing is written then.
    """
    state, epoch = read_release(src)
    backbone = meta_backbone(cfg.backbone)
    with torch.device("meta"):
        side_network = build_side_network(cfg.side, backbone)
    try:
        side, tower, filled = map_release(state, backbone, side_network)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": Path(src).name, "epoch": str(epoch)}
    save_file(_own_storage(tower), str(out / "backbone.safetensors"), metadata=metadata)
    side_meta = {**metadata, "block": side_network.block, "pos_embed": cfg.side.pos_embed}
    save_file(_own_storage(side), str(out / "side.safetensors"), metadata=side_meta)

    buffers = {name for name, _ in side_network.named_buffers()}
    unused = UNUSED_FOR_RECOGNITION[backbone_family(backbone)]
    return ReleaseAccount(
        tensors=len(state),
        frozen=sum(p.numel() for p in backbone.parameters()),  # what the recognition backbone loads
        side=sum(t.numel() for name, t in side.items() if name not in buffers),
        buffers=len(buffers),
        epoch=epoch,
        unused_for_recognition=sorted(k for k in state if k.startswith(unused)),
        filled=filled,
    )


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage with another (safetensors refuses shared memory)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help=".pt/.pth/.bin/.safetensors checkpoint or transformers dir")
    source.add_argument("--side4video", help="a released Side4Video recognition model (Model Zoo .pt)")
    parser.add_argument(
        "--out", required=True, help="output .safetensors file (--src) or directory (--side4video)"
    )
    parser.add_argument(
        "--prefix", default="visual.", help="--src: key prefix of the vision tower ('' keeps all keys)"
    )
    parser.add_argument("--config", help="--side4video: the run config the release must fit")
    parser.add_argument("overrides", nargs="*", help="--side4video: key=value config overrides")
    args = parser.parse_args(argv)
    if args.side4video and not args.config:
        parser.error("--side4video needs --config: the run config the release must fit")
    try:
        if args.src:
            count = convert(args.src, args.out, args.prefix)
            print(f"wrote {count} tensors to {args.out}")
            return 0
        cfg = load_config(args.config, args.overrides)
        account = convert_release(args.side4video, cfg, args.out)
    except (FileNotFoundError, KeyError, ValueError, UnsafeFileError) as exc:  # CorruptFileError: ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.side4video}: {account.line(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
