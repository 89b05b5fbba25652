"""The deformable pixel decoder against the official model's state_dict layout and outputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dinov.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from dinov.modeling.pixel_decoder import DeformablePixelDecoder
from dinov.modeling.position_encoding import PositionEmbeddingSine

PREFIX = "model.sem_seg_head.pixel_decoder."
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
SWIN_T_ENCODER = dict(encoder_in_features=("res3", "res4", "res5"), total_num_feature_levels=4)
SWIN_L_ENCODER = dict(encoder_in_features=("res2", "res3", "res4", "res5"), total_num_feature_levels=5)
MINI_CHANNELS = {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
MINI_SIZES = dict(conv_dim=64, mask_dim=64, num_encoder_layers=2, dim_feedforward=128)


def grid_sample_reference(value, spatial_shapes, locations, weights):
    """Deformable attention read level by level with F.grid_sample (how the official CPU path computes it)."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = locations.shape
    per_level = value.split([int(h * w) for h, w in spatial_shapes.tolist()], dim=1)
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = (2 * locations[:, :, :, lvl] - 1).transpose(1, 2).reshape(n * m, lq, num_points, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    samples = torch.stack(samples, -2)  # [N*M, D, Lq, L, P]
    w = weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels, num_points)
    return (samples * w).sum((-1, -2)).view(n, m * d, lq).transpose(1, 2)


def random_levels(shapes, n, m, d, lq, num_points, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    start = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
    s = int(spatial_shapes.prod(1).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # Many points outside [0, 1] and right on pixel edges, to exercise the zero padding.
    locations = torch.rand(n, lq, m, len(shapes), num_points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    locations[:, :3] = torch.tensor([0.0, 1.0], dtype=dtype)[torch.randint(0, 2, locations[:, :3].shape, generator=g)]
    weights = torch.rand(n, lq, m, len(shapes), num_points, generator=g, dtype=dtype)
    return value, spatial_shapes, start, locations, weights


def build(channels, layout, **sizes):
    return DeformablePixelDecoder(channels, {f: STRIDES[f] for f in channels}, **layout, **sizes)


@pytest.mark.parametrize(
    "manifest, channels, layout",
    [
        ("manifest_swinT.json", {"res2": 96, "res3": 192, "res4": 384, "res5": 768}, SWIN_T_ENCODER),
        ("manifest_swinL.json", {"res2": 192, "res3": 384, "res4": 768, "res5": 1536}, SWIN_L_ENCODER),
    ],
)
def test_state_dict_matches_release(reference_dir, manifest, channels, layout):
    entries = json.loads((reference_dir / manifest).read_text())["state_dict"]
    expected = {k[len(PREFIX) :]: v["shape"] for k, v in entries.items() if k.startswith(PREFIX)}
    # Released sizes: conv/mask dim 256, 6 encoder layers, 8 heads, 4 points, FFN 2048 (DECODER.DIM_FEEDFORWARD).
    got = {k: list(v.shape) for k, v in build(channels, layout).state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected


@pytest.mark.parametrize("name, layout", [("miniT", SWIN_T_ENCODER), ("miniL", SWIN_L_ENCODER)])
def test_matches_official_outputs(reference_dir, name, layout):
    ckpt = torch.load(reference_dir / f"{name}_ckpt.pth", map_location="cpu", weights_only=True)["model"]
    io = torch.load(reference_dir / f"{name}_io.pt", map_location="cpu", weights_only=True)
    decoder = build(MINI_CHANNELS, layout, **MINI_SIZES).eval()
    decoder.load_state_dict({k[len(PREFIX) :]: v for k, v in ckpt.items() if k.startswith(PREFIX)}, strict=True)

    with torch.no_grad():
        mask_features, multi_scale = decoder({f: io[f"tgt_backbone_{f}"] for f in STRIDES})

    num_levels = layout["total_num_feature_levels"]
    assert len(multi_scale) == num_levels
    diffs = {}
    for i, feat in enumerate(multi_scale):
        expected = io[f"tgt_multi_scale_{i}"]
        assert feat.shape == expected.shape
        diffs[f"multi_scale_{i}"] = (feat - expected).abs().max().item()
    assert mask_features.shape == io["tgt_mask_features"].shape
    diffs["mask_features"] = (mask_features - io["tgt_mask_features"]).abs().max().item()
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4


def test_batch_equals_single_images(reference_dir):
    ckpt = torch.load(reference_dir / "miniT_ckpt.pth", map_location="cpu", weights_only=True)["model"]
    io = torch.load(reference_dir / "miniT_io.pt", map_location="cpu", weights_only=True)
    decoder = build(MINI_CHANNELS, SWIN_T_ENCODER, **MINI_SIZES).eval()
    decoder.load_state_dict({k[len(PREFIX) :]: v for k, v in ckpt.items() if k.startswith(PREFIX)})
    first = {f: io[f"tgt_backbone_{f}"] for f in STRIDES}
    second = {f: v.flip(-1) * 0.5 + 0.1 for f, v in first.items()}
    with torch.no_grad():
        batched = decoder({f: torch.cat((first[f], second[f])) for f in STRIDES})
        singles = [decoder(first), decoder(second)]
    for b, single in enumerate(singles):
        torch.testing.assert_close(batched[0][b : b + 1], single[0], atol=1e-5, rtol=0)
        for got, want in zip(batched[1], single[1]):
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=0)
    assert (singles[0][0] - singles[1][0]).abs().max() > 1e-2  # the two images really differ


def test_high2low_is_low2high_with_levels_reversed():
    torch.manual_seed(0)
    low2high = build(MINI_CHANNELS, SWIN_T_ENCODER, **MINI_SIZES).eval()
    high2low = build(MINI_CHANNELS, SWIN_T_ENCODER, **MINI_SIZES, feature_order="high2low").eval()
    # Same weights with the level axis reversed: input_proj lists res5, res4, res3, extra.
    state = dict(low2high.state_dict())
    for k in [k for k in state if k.startswith("input_proj.0.")]:
        state[k], state[k.replace(".0.", ".2.", 1)] = state[k.replace(".0.", ".2.", 1)], state[k]
    state["transformer.level_embed"] = state["transformer.level_embed"].flip(0)
    heads, levels = 8, 4
    for k in list(state):
        if ".sampling_offsets." in k or ".attention_weights." in k:
            t = state[k]
            state[k] = t.view(heads, levels, -1, *t.shape[1:]).flip(1).reshape(t.shape)
    high2low.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    feats = {f: torch.randn(2, c, 64 // STRIDES[f], 96 // STRIDES[f], generator=g) for f, c in MINI_CHANNELS.items()}
    with torch.no_grad():
        mask_a, levels_a = low2high(feats)
        mask_b, levels_b = high2low(feats)
    assert [x.shape[-1] for x in levels_a] == [12, 6, 3, 2]
    torch.testing.assert_close(mask_a, mask_b, atol=1e-5, rtol=0)
    for a, b in zip(levels_a, levels_b[::-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_core_matches_grid_sample():
    shapes = [(12, 17), (6, 9), (3, 5), (2, 3)]
    value, spatial_shapes, start, locations, weights = random_levels(shapes, n=2, m=4, d=8, lq=50, num_points=3)
    got = ms_deform_attn_core(value, spatial_shapes, start, locations, weights)
    want = grid_sample_reference(value, spatial_shapes, locations, weights)
    assert got.shape == (2, 50, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_core_gradients_match_grid_sample():
    shapes = [(5, 7), (3, 4)]
    inputs = random_levels(shapes, n=2, m=2, d=3, lq=6, num_points=2, dtype=torch.float64, seed=3)
    value, spatial_shapes, start, locations, weights = inputs
    locations = locations.clamp(0.02, 0.98)  # keep points off pixel edges, where the gradient jumps
    grads = []
    for fn in (lambda v, l, w: ms_deform_attn_core(v, spatial_shapes, start, l, w),
               lambda v, l, w: grid_sample_reference(v, spatial_shapes, l, w)):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("box", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msdeformattn_forward_and_gradients(box, dtype):
    torch.manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3)]
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    spatial_shapes = torch.tensor(shapes)
    start = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
    s = int(spatial_shapes.prod(1).sum())
    query, memory = torch.randn(2, 7, 32, dtype=dtype), torch.randn(2, s, 32, dtype=dtype)
    ref = torch.rand(2, 7, 3, 4 if box else 2, dtype=dtype)
    padding = torch.rand(2, s) < 0.2

    def official_style():
        # The official forward: [N, Lq, M, L, P, 2] locations, then grid_sample per level.
        value = attn.value_proj(memory).masked_fill(padding[..., None], 0).view(2, s, 4, 8)
        offsets = attn.sampling_offsets(query).view(2, 7, 4, 3, 2, 2)
        weights = attn.attention_weights(query).view(2, 7, 4, 6).softmax(-1).view(2, 7, 4, 3, 2)
        if box:
            locations = ref[:, :, None, :, None, :2] + offsets / 2 * ref[:, :, None, :, None, 2:] * 0.5
        else:
            wh = spatial_shapes.flip(-1)
            locations = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        return attn.output_proj(grid_sample_reference(value, spatial_shapes, locations, weights))

    results = []
    for fn in (lambda: attn(query, ref, memory, spatial_shapes, start, padding), official_style):
        attn.zero_grad()
        out = fn()
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in attn.parameters()]))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(results[0][0], results[1][0], atol=tol, rtol=0)
    if dtype == torch.float64:  # gradients in float64 only: float32 rounding makes them noisier
        for got, want in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_msdeformattn_rejects_bad_inputs():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([(4, 4), (2, 2)])
    start = torch.tensor([0, 16])
    with pytest.raises(ValueError, match="add up to"):
        attn(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 19, 16), shapes, start)
    with pytest.raises(ValueError, match="must end in 2"):
        attn(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 3), torch.randn(1, 20, 16), shapes, start)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_pixel_decoder_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError, match="encoder_in_features"):
        build(MINI_CHANNELS, dict(encoder_in_features=("res6",), total_num_feature_levels=4), **MINI_SIZES)
    with pytest.raises(ValueError, match="total_num_feature_levels"):
        build(MINI_CHANNELS, dict(encoder_in_features=("res3", "res4", "res5"), total_num_feature_levels=2))
    decoder = build(MINI_CHANNELS, SWIN_T_ENCODER, **MINI_SIZES)
    with pytest.raises(KeyError, match="res2"):
        decoder({f: torch.zeros(1, c, 2, 2) for f, c in MINI_CHANNELS.items() if f != "res2"})


def test_sine_embedding_with_padding_equals_unpadded_crop():
    pe = PositionEmbeddingSine(16, normalize=True)
    x = torch.zeros(2, 3, 9, 13)
    mask = torch.zeros(2, 9, 13, dtype=torch.bool)
    torch.testing.assert_close(pe(x, mask), pe(x), atol=0, rtol=0)
    # Normalised coordinates run over the valid part only: a padded image embeds like its crop.
    mask[1, 6:, :] = True
    mask[1, :, 10:] = True
    padded = pe(x, mask)
    torch.testing.assert_close(padded[1, :, :6, :10], pe(torch.zeros(1, 3, 6, 10))[0], atol=1e-6, rtol=0)
    assert padded.shape == (2, 32, 9, 13)
    # Channel 0 is sin of the normalised row (i + 1) / H * 2 pi; channel 1 its cos; x starts at channel 16.
    rows = torch.tensor([1.0, 9.0]) / 9 * 2 * math.pi
    torch.testing.assert_close(padded[0, 0, [0, -1], 0], rows.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[0, 1, [0, -1], 0], rows.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[0, 16, 0, -1], torch.tensor(0.0), atol=1e-5, rtol=0)
