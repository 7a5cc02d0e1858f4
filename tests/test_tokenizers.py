"""BEVT's frozen tokenizers: the DALL-E-compatible dVAE encoder and the k-means codebook over ViT features."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from launch import fit_tokenizer
from models.tokenizers import (
    DVAEEncoder,
    TokenizerConfig,
    build_tokenizer,
    fit_kmeans,
    map_pixels,
    resize,
)
from trainer.frozen import place_frozen

HIDDEN, VOCAB, SIZE = 8, 32, 32


def dvae_checkpoint(path, suffix: str = ".pt") -> tuple[DVAEEncoder, str]:
    """A random encoder (weights spread so codes vary) and its state_dict saved as DALL-E users would."""
    torch.manual_seed(0)
    encoder = DVAEEncoder(HIDDEN, VOCAB)
    for param in encoder.parameters():
        param.data.normal_(0, 0.5)
    file = str(path / f"encoder{suffix}")
    if suffix == ".safetensors":
        save_file(encoder.state_dict(), file)
    else:
        torch.save(encoder.state_dict(), file)
    return encoder, file


def frames(batch: int = 3, size: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def dvae_config(path: str) -> TokenizerConfig:
    return TokenizerConfig(kind="dvae", path=path, input_size=SIZE, vocab_size=VOCAB, dvae_hidden=HIDDEN)


def test_dvae_parameter_names_follow_dall_e():
    names = dict(DVAEEncoder(HIDDEN, VOCAB).named_parameters())
    expected = {
        "blocks.input.w": (HIDDEN, 3, 7, 7),
        "blocks.group_1.block_1.res_path.conv_1.w": (HIDDEN // 4, HIDDEN, 3, 3),
        "blocks.group_1.block_2.res_path.conv_4.b": (HIDDEN,),
        "blocks.group_2.block_1.id_path.w": (2 * HIDDEN, HIDDEN, 1, 1),
        "blocks.group_4.block_2.res_path.conv_3.w": (2 * HIDDEN, 2 * HIDDEN, 3, 3),
        "blocks.output.conv.w": (VOCAB, 8 * HIDDEN, 1, 1),
        "blocks.output.conv.b": (VOCAB,),
    }
    for name, shape in expected.items():
        assert tuple(names[name].shape) == shape, name
    # the width stays within a group: no projection on its second block nor on group 1's first
    assert "blocks.group_1.block_1.id_path.w" not in names
    assert "blocks.group_2.block_2.id_path.w" not in names
    # DALL-E: 4 groups x 2 blocks, 4 convs each, id projections on groups 2-4, the input and output convs
    assert len(names) == 2 * (8 * 4 + 3 + 2)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dvae_tokenizer_loads_a_state_dict_and_matches_its_source(tmp_path, suffix):
    source, path = dvae_checkpoint(tmp_path, suffix)
    tokenizer = build_tokenizer(dvae_config(path))
    clip = frames()
    codes = tokenizer(clip)
    assert codes.shape == (3, SIZE // 8, SIZE // 8) and codes.dtype == torch.int64
    assert (tokenizer.vocab_size, tokenizer.grid, tokenizer.input_size) == (VOCAB, SIZE // 8, SIZE)
    with torch.no_grad():
        pixels = map_pixels(resize(clip.float() / 255, SIZE), 0.1)
        expected = source(pixels).argmax(dim=1)
    assert torch.equal(codes, expected)
    assert codes.unique().numel() > 1  # the comparison means something


def test_dvae_tokenizer_is_frozen(tmp_path):
    _, path = dvae_checkpoint(tmp_path)
    tokenizer = build_tokenizer(dvae_config(path))
    tokenizer.train()
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    assert tokenizer(frames()).grad_fn is None


def test_map_pixels_range():
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(map_pixels(x, 0.1), torch.tensor([0.1, 0.5, 0.9]))


def test_dvae_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bevt\.tokenizer\.path:.*encoder\.pkl"):
        build_tokenizer(TokenizerConfig(kind="dvae"))
    with pytest.raises(FileNotFoundError, match=r"bevt\.tokenizer\.path"):
        build_tokenizer(dvae_config(str(tmp_path / "absent.pt")))
    state = DVAEEncoder(HIDDEN, VOCAB).state_dict()
    state["blocks.extra.w"] = state.pop("blocks.input.w")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(
        KeyError, match=r"1 missing \['blocks\.input\.w'\].*1 unexpected \['blocks\.extra\.w'\]"
    ):
        build_tokenizer(dvae_config(str(tmp_path / "renamed.pt")))


@pytest.mark.parametrize(
    ("field", "value"), [("kind", "pixels"), ("input_size", 100), ("eps", 0.5), ("dvae_hidden", 6)]
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=rf"^bevt\.tokenizer\.{field}:"):
        TokenizerConfig(**{field: value})


def test_dvae_tokenizer_placed_by_place_frozen(tmp_path):
    _, path = dvae_checkpoint(tmp_path)
    dist = SimpleNamespace(device=torch.device("cpu"), is_main=True)
    model, run = place_frozen(
        lambda construct, gather, writer: build_tokenizer(dvae_config(path), construct, gather, writer),
        dist,
        None,
    )
    clip = frames()
    assert torch.equal(run(clip), build_tokenizer(dvae_config(path))(clip))
    assert not any(p.requires_grad for p in model.parameters())


def blobs(points: int = 150, dim: int = 16, clusters: int = 5, seed: int = 0):
    """Points around ``clusters`` random directions (cosine to their centre about 0.99)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.arange(clusters).repeat_interleave(points)
    scale = 3.0 * torch.rand(len(labels), 1, generator=generator) + 0.5  # norms must not matter
    data = scale * (centres[labels] + 0.03 * torch.randn(len(labels), dim, generator=generator))
    order = torch.randperm(len(labels), generator=generator)
    return data[order], labels[order], centres


def test_fit_kmeans_recovers_separated_clusters():
    data, labels, centres = blobs()
    centroids = fit_kmeans(data, codes=5, iters=20, seed=0)
    assert centroids.shape == (5, 16)
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(5), atol=1e-5)
    match = (centres @ centroids.T).argmax(dim=1)  # the centroid of each true centre
    assert sorted(match.tolist()) == list(range(5))  # one centroid per cluster
    assert (centres @ centroids.T).max(dim=1).values.min() > 0.99
    assigned = (torch.nn.functional.normalize(data, dim=-1) @ centroids.T).argmax(dim=1)
    assert torch.equal(assigned, match[labels])


def test_fit_kmeans_is_deterministic_and_survives_duplicates():
    data, _, _ = blobs(seed=1)
    assert torch.equal(fit_kmeans(data, 8, seed=3), fit_kmeans(data, 8, seed=3))
    repeated = torch.eye(4).repeat(10, 1)  # 4 distinct points for 6 codes: clusters left empty
    centroids = fit_kmeans(repeated, 6, seed=0)
    assert torch.isfinite(centroids).all() and centroids.shape == (6, 4)
    with pytest.raises(ValueError, match="codes need"):
        fit_kmeans(repeated, 41)


@pytest.fixture(scope="module")
def codebook(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer") / "kmeans.pt"
    argv = [
        "--shards",
        str(tiny_shards / "train-{000000..000002}.tar"),
        "--backbone",
        "tiny",
        "--codes",
        "6",
        "--clips",
        "12",
        "--frames",
        "4",
        "--batch",
        "5",
        "--workers",
        "0",
        "--iters",
        "10",
        "--out",
        str(out),
    ]
    assert fit_tokenizer.main(argv) == 0
    return out


def test_fit_tokenizer_cli_writes_a_codebook(codebook):
    stored = torch.load(codebook, weights_only=True)
    assert stored["centroids"].shape == (6, 32)
    assert stored["layer"] == 1  # --layer -1: the last of tiny's two blocks
    assert stored["backbone"]["name"] == "tiny" and stored["backbone"]["tap_layers"] == [1]
    assert stored["samples"] == 12 and stored["features"] == 12 * 4 * 16  # clips x frames x 4x4 patches
    assert "state_dict" in stored  # random backbone weights travel with the codebook


def test_fit_tokenizer_cli_prints_a_summary(tiny_shards, tmp_path, capsys):
    argv = ["--shards", str(tiny_shards / "train-000000.tar"), "--backbone", "tiny", "--codes", "4"]
    assert fit_tokenizer.main([*argv, "--clips", "3", "--workers", "0", "--out", str(tmp_path / "k.pt")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fit_tokenizer: 3 clips, 192 feature vectors") and "entropy" in line, line
    assert "codes used" in line and "mean cosine to centroid" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shards", "/nonexistent/train-000000.tar"], "do not exist"),
        (["--layer", "5"], "--layer: 5 is out of range"),
        (["--codes", "100000"], "codes need"),
    ],
)
def test_fit_tokenizer_cli_refuses_bad_input(tiny_shards, tmp_path, capsys, argv, message):
    base = {"--shards": str(tiny_shards / "train-000000.tar"), "--backbone": "tiny", "--clips": "2"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    args = [item for pair in base.items() for item in pair]
    assert fit_tokenizer.main([*args, "--workers", "0", "--out", str(tmp_path / "k.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "k.pt").exists()


def test_kmeans_tokenizer_maps_frames_to_codes(codebook):
    tokenizer = build_tokenizer(TokenizerConfig(kind="kmeans", path=str(codebook)))
    assert (tokenizer.vocab_size, tokenizer.grid, tokenizer.input_size) == (6, 4, 32)
    clip = frames(4, 32)
    codes = tokenizer(clip)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 6
    assert codes.unique().numel() > 1
    assert tokenizer(frames(4, 48)).shape == (4, 4, 4)  # other sizes are resized to the backbone's
    # the stored weights come back: a second build (other random initial weights) gives the same codes
    torch.manual_seed(123)
    assert torch.equal(build_tokenizer(TokenizerConfig(kind="kmeans", path=str(codebook)))(clip), codes)
    tokenizer.train()
    assert not tokenizer.training
    assert not any(p.requires_grad for p in tokenizer.parameters())
    assert sum(p.numel() for p in tokenizer.parameters() if p.requires_grad) == 0


def test_kmeans_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bevt\.tokenizer\.path:.*launch\.fit_tokenizer"):
        build_tokenizer(TokenizerConfig(kind="kmeans"))
    with pytest.raises(FileNotFoundError, match=r"bevt\.tokenizer\.path: .*absent\.pt does not exist"):
        build_tokenizer(TokenizerConfig(kind="kmeans", path=str(tmp_path / "absent.pt")))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"bevt\.tokenizer\.path: .*not a codebook.*found \['weights'\]"):
        build_tokenizer(TokenizerConfig(kind="kmeans", path=str(tmp_path / "other.pt")))
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"bevt\.tokenizer\.path: .*not a codebook"):
        build_tokenizer(TokenizerConfig(kind="kmeans", path=str(tmp_path / "text.pt")))
