import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinov.modeling.swin import SwinTransformer, build_swin_large, build_swin_tiny

BACKBONE_PREFIX = "model.backbone."
PIXEL_MEAN = torch.tensor([123.675, 116.280, 103.530])
PIXEL_STD = torch.tensor([58.395, 57.120, 57.375])
TOLERANCE = 1e-4


def normalise_and_pad(image: torch.Tensor, divisor: int = 32) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [1, 3, H', W'], zero-padded bottom/right after normalising."""
    x = (image.float() - PIXEL_MEAN[:, None, None]) / PIXEL_STD[:, None, None]
    h, w = x.shape[1:]
    return F.pad(x, (0, -w % divisor, 0, -h % divisor))[None]


def manifest_backbone(reference_dir: Path, name: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads((reference_dir / name).read_text())["state_dict"]
    return {
        k[len(BACKBONE_PREFIX):]: tuple(v["shape"]) for k, v in manifest.items() if k.startswith(BACKBONE_PREFIX)
    }


@pytest.mark.parametrize(
    "builder, manifest_name", [(build_swin_tiny, "manifest_swinT.json"), (build_swin_large, "manifest_swinL.json")]
)
def test_state_dict_matches_manifest(reference_dir, builder, manifest_name):
    expected = manifest_backbone(reference_dir, manifest_name)
    with torch.device("meta"):  # shapes only; Swin-L would otherwise allocate ~200M floats
        model = builder()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    mismatched = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    assert mismatched == {}


def test_explicit_constructor_matches_manifest_swin_tiny(reference_dir):
    expected = manifest_backbone(reference_dir, "manifest_swinT.json")
    with torch.device("meta"):
        model = SwinTransformer(
            embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, pretrain_img_size=224
        )
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def build_mini(reference_dir: Path, name: str) -> SwinTransformer:
    cfg = json.loads((reference_dir / f"{name}_config.json").read_text())["overrides"]["BACKBONE.SWIN"]
    model = SwinTransformer(
        embed_dim=cfg["EMBED_DIM"],
        depths=cfg["DEPTHS"],
        num_heads=cfg["NUM_HEADS"],
        window_size=cfg["WINDOW_SIZE"],
        mlp_ratio=cfg["MLP_RATIO"],
        patch_size=cfg["PATCH_SIZE"],
        pretrain_img_size=cfg["PRETRAIN_IMG_SIZE"],
    )
    ckpt = torch.load(reference_dir / f"{name}_ckpt.pth", map_location="cpu", weights_only=True)["model"]
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt.items() if k.startswith(BACKBONE_PREFIX)}
    model.load_state_dict(backbone, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", ["miniT", "miniL"])
def test_backbone_matches_official_outputs(reference_dir, name):
    model = build_mini(reference_dir, name)
    io = torch.load(reference_dir / f"{name}_io.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        out = model(normalise_and_pad(io["tgt_image"]))
    assert sorted(out) == ["res2", "res3", "res4", "res5"]
    for level in ("res2", "res3", "res4", "res5"):
        expected = io[f"tgt_backbone_{level}"]
        assert out[level].shape == expected.shape, level
        diff = (out[level] - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{name} {level}: max abs diff {diff:.3g}"


def test_unpadded_input_gives_feature_map_of_ceil_sizes():
    model = SwinTransformer(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 70, 99))
    # patch 4 -> 18x25, then ceil halving: 9x13, 5x7, 3x4
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 16, 18, 25),
        "res3": (2, 32, 9, 13),
        "res4": (2, 64, 5, 7),
        "res5": (2, 128, 3, 4),
    }
    assert model.out_feature_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.out_feature_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=7).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        both = model(x)
        second = model(x[1:])
    for level in both:
        torch.testing.assert_close(both[level][1:], second[level], atol=1e-5, rtol=0)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = SwinTransformer(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.5
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        a, b = model(x)["res5"], model(x)["res5"]
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(1)
        trained = [model(x)["res5"] for _ in range(4)]
    assert any(not torch.allclose(t, a) for t in trained)


def test_rejects_non_batched_input():
    model = SwinTransformer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=7)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.zeros(3, 64, 64))


def test_gradient_checkpointing_gives_the_same_gradients():
    kwargs = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0)
    torch.manual_seed(0)
    plain = SwinTransformer(**kwargs).train()
    checkpointed = SwinTransformer(**kwargs, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for model in (plain, checkpointed):
        sum(v.square().sum() for v in model(x).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
