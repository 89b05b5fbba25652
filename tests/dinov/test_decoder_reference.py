"""The DINOv decoder head against the official implementation's outputs (see shared/dinov_reference/README.md).

The head is built from each mini config, loaded with the mini checkpoint's ``sem_seg_head.predictor.*`` tensors and
fed the recorded pixel-decoder outputs; every recorded head output must agree to 1e-4 (fp32, CPU).
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinov.modeling.box_ops import grid_points, point_boxes
from dinov.modeling.decoder import QueryBlock, SelfAttentionLayout
from dinov.modeling.dinov_head import DINOvHead
from dinov.modeling.prompt_encoder import (
    CrossAttentionLayer,
    PromptContent,
    content_attention_mask,
    mean_content_label,
    visible_cells,
)

TOL = 1e-4
PREFIX = "model.sem_seg_head.predictor."
SIZE_DIVISIBILITY = 32


def head_from_overrides(overrides: dict) -> DINOvHead:
    dec, enc = overrides["DECODER"], overrides["ENCODER"]
    return DINOvHead(
        hidden_dim=dec["HIDDEN_DIM"], num_queries=dec["NUM_OBJECT_QUERIES"], nheads=dec["NHEADS"],
        dim_feedforward=dec["DIM_FEEDFORWARD"], dec_layers=dec["DEC_LAYERS"], mask_dim=enc["MASK_DIM"],
        dim_proj=overrides["DIM_PROJ"], total_num_feature_levels=dec["TOTAL_NUM_FEATURE_LEVELS"],
        num_interactive_tokens=dec["NUM_INTERACTIVE_TOKENS"], num_content_tokens=dec["NUM_CONTENT_TOKENS"],
        content_independent=True,  # CONTENT_INDEPENDENT: True in both released yamls
    )


class Mini:
    def __init__(self, reference_dir: Path, name: str) -> None:
        config = json.loads((reference_dir / f"{name}_config.json").read_text())
        self.head = head_from_overrides(config["overrides"]).eval()
        sd = torch.load(reference_dir / f"{name}_ckpt.pth", map_location="cpu", weights_only=True)["model"]
        # the checkpoint stores shared tensors under all their names, as does the head's state_dict
        self.head.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, strict=True)
        self.io = torch.load(reference_dir / f"{name}_io.pt", map_location="cpu", weights_only=True)
        levels = self.head.num_feature_levels
        self.ref = [self.io[f"ref_multi_scale_{i}"] for i in range(levels)]
        self.tgt = [self.io[f"tgt_multi_scale_{i}"] for i in range(levels)]
        self.tgt_mask_features = self.io["tgt_mask_features"]

    def padded(self, key: str) -> torch.Tensor:
        """A 1xHxW prompt, zero-padded like its image."""
        mask = self.io[key]
        h, w = mask.shape[-2:]
        ph, pw = -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        return F.pad(mask, (0, pw - w, 0, ph - h))


@pytest.fixture(scope="module", params=["miniT", "miniL"])
def mini(request, reference_dir) -> Mini:
    return Mini(reference_dir, request.param)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}")
    assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"


# ----------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("manifest_name,levels", [("manifest_swinT.json", 4), ("manifest_swinL.json", 5)])
def test_state_dict_matches_manifest(reference_dir, manifest_name, levels):
    manifest = json.loads((reference_dir / manifest_name).read_text())
    expected = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(PREFIX)}
    for key, aliases in manifest["aliases"].items():
        if key.startswith(PREFIX):
            for alias in aliases:
                expected[alias[len(PREFIX):]] = expected[key[len(PREFIX):]]
    head = DINOvHead(hidden_dim=256, num_queries=300, nheads=8, dim_feedforward=2048, dec_layers=9, mask_dim=256,
                     dim_proj=512, total_num_feature_levels=levels)
    actual = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert actual == expected
    # the aliases really are one tensor
    assert head.decoder_norm is head.decoder.norm
    assert all(m is head._bbox_embed for m in head.bbox_embed) and head.decoder.bbox_embed is head.bbox_embed


# ----------------------------------------------------------------------------- prompt encoder


def test_encode_prompts(mini):
    io = mini.io
    with torch.no_grad():
        one = mini.head.encode_prompts(mini.ref, mini.padded("ref_mask"))
        three = mini.head.encode_prompts(
            mini.ref, torch.cat([mini.padded("ref_mask"), mini.padded("ref_mask2"), mini.padded("ref_mask3")]))
        click = mini.head.encode_prompts(mini.tgt, mini.padded("tgt_mask"))
    assert_close("content_label_1ex", one.label, io["content_label_1ex"])
    assert_close("content_bbox_1ex", one.bbox, io["content_bbox_1ex"])
    assert torch.equal(one.attn_mask, io["content_attn_1ex"])
    assert_close("content_label_3", three.label, io["content_label_3"])
    assert_close("content_bbox_3", three.bbox, io["content_bbox_3"])
    assert torch.equal(three.attn_mask, io["content_attn_3"])
    assert_close("click_content_label", click.label, io["click_content_label"])


def test_attending_only_to_visible_cells_equals_the_masked_level():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=32, nhead=4).eval()
    memory = torch.randn(1, 300, 32)
    tokens, query_pos = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    blocked = torch.ones(3, 300, dtype=torch.bool)
    blocked[0, 10:14] = False  # a click: a few cells
    blocked[1, 100:160] = False  # an object
    blocked[2, 150:170] = False  # overlapping the object
    kept_memory, kept_mask = visible_cells(memory, blocked)
    assert kept_memory.shape == (1, 4 + 70, 32) and kept_mask.shape == (3, 74)
    with torch.no_grad():
        full = layer(tokens, memory, memory_mask=blocked, query_pos=query_pos)
        kept = layer(tokens, kept_memory, memory_mask=kept_mask, query_pos=query_pos)
    assert (full - kept).abs().max() < 1e-5
    # a prompt that sees the whole level (it covered no cell) keeps every cell
    blocked[1] = False
    assert visible_cells(memory, blocked)[0] is memory


def test_encode_prompts_rejects_bad_input(mini):
    with pytest.raises(ValueError, match="prompt_masks"):
        mini.head.encode_prompts(mini.ref, mini.padded("ref_mask")[0])
    with pytest.raises(ValueError, match="multi-scale"):
        mini.head.encode_prompts(mini.ref[:-1], mini.padded("ref_mask"))
    with pytest.raises(ValueError, match="padded image size"):
        mini.head.encode_prompts(mini.ref, mini.io["ref_mask"])  # not padded


def test_mean_content_label():
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    assert torch.allclose(mean_content_label([a, b]), (a + b) / 2)
    with pytest.raises(ValueError):
        mean_content_label([])


# ----------------------------------------------------------------------------- generic decoding


@pytest.mark.parametrize("label_key,prefix", [("content_label_1ex", "openset_raw"),
                                              ("content_label_avg2", "openset_avg2_raw"),
                                              ("content_label_3", "openset3_raw")])
def test_decode_generic(mini, label_key, prefix):
    io = mini.io
    with torch.no_grad():
        out = mini.head.decode_generic(mini.tgt, mini.tgt_mask_features, io[label_key])
    for key in ("pred_logits", "pred_masks", "pred_boxes", "pred_match_score"):
        assert_close(f"{prefix}_{key}", out[key], io[f"{prefix}_{key}"])
    assert len(out["aux_outputs"]) == mini.head.num_layers - 1
    for i, aux in enumerate(out["aux_outputs"]):
        for key in ("pred_logits", "pred_boxes", "pred_match_score"):
            assert_close(f"{prefix}_aux{i}_{key}", aux[key], io[f"{prefix}_aux{i}_{key}"])


def test_decode_generic_without_masks(mini):
    io = mini.io
    with torch.no_grad():
        out = mini.head.decode_generic(mini.tgt, mini.tgt_mask_features, io["content_label_1ex"], with_masks=False)
    assert "pred_masks" not in out
    masks = torch.einsum("bqc,bchw->bqhw", out["mask_embed"], mini.tgt_mask_features)
    assert_close("openset masks from mask_embed", masks, io["openset_raw_pred_masks"])


def test_decode_generic_without_earlier_layers(mini):
    """aux=False (inference) skips the earlier layers' heads; the last layer's outputs stay the official ones."""
    io = mini.io
    with torch.no_grad():
        out = mini.head.decode_generic(mini.tgt, mini.tgt_mask_features, io["content_label_1ex"], with_masks=False,
                                       aux=False)
    assert out["aux_outputs"] == []
    assert_close("openset logits without aux", out["pred_logits"], io["openset_raw_pred_logits"])
    assert_close("openset boxes without aux", out["pred_boxes"], io["openset_raw_pred_boxes"])


def test_sample_projection_equals_msdeformattn(mini):
    """The decoder's cross-attention (project samples, not the memory) equals calling MSDeformAttn itself."""
    io = mini.io
    prompt = PromptContent(io["content_label_3"], io["content_bbox_3"], io["content_attn_3"])
    outputs = {}
    try:
        for project_samples in (True, False):
            mini.head.decoder.project_samples = project_samples
            with torch.no_grad():
                outputs[project_samples] = (
                    mini.head.decode_generic(mini.tgt, mini.tgt_mask_features, io["content_label_3"]),
                    mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, io["click_boxes_dn"]))
    finally:
        mini.head.decoder.project_samples = True
    (generic_fast, refer_fast), (generic_module, refer_module) = outputs[True], outputs[False]
    for key in ("pred_logits", "pred_masks", "pred_boxes"):
        assert_close(f"projected samples vs MSDeformAttn: generic {key}", generic_fast[key], generic_module[key], 1e-5)
        assert_close(f"MSDeformAttn: openset3_raw_{key}", generic_module[key], io[f"openset3_raw_{key}"])
    for key in ("pred_masks", "pred_ious", "pred_boxes", "pred_match_score"):
        assert_close(f"projected samples vs MSDeformAttn: refer {key}", refer_fast[key], refer_module[key], 1e-5)


def test_sample_projection_gradients_equal_msdeformattn(mini):
    """Training through the reordered cross-attention gives the gradients MSDeformAttn gives."""
    head = mini.head
    names = ("decoder.layers.0.cross_attn.value_proj.weight", "decoder.layers.0.cross_attn.value_proj.bias",
             "decoder.layers.1.cross_attn.sampling_offsets.weight", "decoder.layers.2.cross_attn.attention_weights.bias",
             "query_feat.weight")
    grads = {}
    try:
        for project_samples in (True, False):
            head.decoder.project_samples = project_samples
            head.zero_grad()
            features = [f.clone().requires_grad_(True) for f in mini.tgt]
            out = head.decode_generic(features, mini.tgt_mask_features, mini.io["content_label_1ex"])
            (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["pred_masks"].mean()).backward()
            params = dict(head.named_parameters())
            grads[project_samples] = [params[n].grad.clone() for n in names] + [f.grad for f in features]
    finally:
        head.decoder.project_samples = True
        head.zero_grad()
    for name, fast, module in zip(names + tuple(f"features[{i}]" for i in range(len(mini.tgt))), *grads.values()):
        scale = module.abs().max().item()
        assert scale > 0, name
        assert_close(f"gradient {name} (relative)", fast / scale, module / scale, 1e-4)


def test_decode_generic_batch_equals_single(mini):
    io = mini.io
    flipped = [f.flip(-1) for f in mini.tgt]
    batch = [torch.cat([a, b]) for a, b in zip(mini.tgt, flipped)]
    mask_features = torch.cat([mini.tgt_mask_features, mini.tgt_mask_features.flip(-1)])
    with torch.no_grad():
        both = mini.head.decode_generic(batch, mask_features, io["content_label_3"])
        second = mini.head.decode_generic(flipped, mini.tgt_mask_features.flip(-1), io["content_label_3"])
    for key in ("pred_logits", "pred_masks", "pred_boxes"):
        assert_close(f"batch[0] {key}", both[key][:1], io[f"openset3_raw_{key}"])
        assert_close(f"batch[1] {key}", both[key][1:], second[key], tol=1e-5)


# ----------------------------------------------------------------------------- referring decoding


def test_decode_referring_grid(mini):
    io = mini.io
    padded_size = tuple(int(s) * 4 for s in mini.tgt_mask_features.shape[-2:])
    boxes = point_boxes(grid_points(20, padded_size), padded_size)
    assert torch.equal(boxes, io["refer_grid_boxes_dn"])
    prompt = PromptContent(io["content_label_3"], io["content_bbox_3"], io["content_attn_3"])
    with torch.no_grad():
        out = mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, boxes)
    for key in ("pred_ious", "pred_match_score", "pred_boxes"):
        assert_close(f"refer_raw_{key}", out[key], io[f"refer_raw_{key}"])
    assert_close("refer_raw_pred_logits", out["pred_logits"], io["refer_raw_pred_match_score"])
    subset = io["refer_raw_pred_masks_subset_index"]
    assert out["pred_masks"].shape == (1, 2400) + tuple(mini.tgt_mask_features.shape[-2:])
    assert_close("refer_raw_pred_masks_subset", out["pred_masks"][0, subset], io["refer_raw_pred_masks_subset"])
    # mask_embed gives the same masks
    again = torch.einsum("qc,chw->qhw", out["mask_embed"][0, subset], mini.tgt_mask_features[0])
    assert_close("masks from mask_embed", again, out["pred_masks"][0, subset], tol=1e-5)


def test_decode_referring_clicks(mini):
    io = mini.io
    padded_size = tuple(int(s) * 4 for s in mini.tgt_mask_features.shape[-2:])
    boxes = point_boxes(io["click_points"], padded_size)
    assert torch.equal(boxes, io["click_boxes_dn"])
    with torch.no_grad():
        prompt = mini.head.encode_prompts(mini.tgt, mini.padded("tgt_mask"))
        out = mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, boxes)
    for key in ("pred_logits", "pred_masks", "pred_boxes", "pred_match_score", "pred_ious"):
        assert_close(f"click_raw_{key}", out[key], io[f"click_raw_{key}"])


def test_referring_blockwise_equals_dense(mini):
    """The block-wise self-attention gives what the official dense [nq, nq] mask gives."""
    torch.manual_seed(0)
    boxes = torch.rand(5, 4) * 0.5 + 0.25
    label = torch.randn(1, 2, mini.head.hidden_dim)
    prompt = PromptContent(label, mini.io["content_bbox_3"][:, :2], content_attention_mask(2))
    with torch.no_grad():
        fast = mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, boxes)
        dense = mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, boxes, dense_attention=True)
    for key in ("pred_masks", "pred_ious", "pred_match_score", "pred_boxes"):
        assert_close(f"block-wise vs dense {key}", fast[key], dense[key], tol=1e-5)


def test_layout_dense_mask_is_the_official_mask():
    """dense_mask() rebuilds the official referring mask: 6-query groups per box, prompts apart."""
    k, p, n = 6, 4, 3
    content = content_attention_mask(n)
    layout = SelfAttentionLayout(blocks=(QueryBlock(p, k), QueryBlock(1, n, content)))
    total = p * k + n
    official = torch.ones(total, total, dtype=torch.bool)
    official[:p * k, :p * k] = True
    for i in range(p):
        official[i * k:(i + 1) * k, i * k:(i + 1) * k] = False
    official[p * k:, p * k:] = content
    assert torch.equal(layout.dense_mask(), official)


def test_decode_referring_batch_and_validation(mini):
    io = mini.io
    prompt = PromptContent(io["content_label_3"], io["content_bbox_3"], io["content_attn_3"])
    batch = [torch.cat([f, f]) for f in mini.tgt]
    with torch.no_grad():
        out = mini.head.decode_referring(batch, torch.cat([mini.tgt_mask_features] * 2), prompt,
                                         io["click_boxes_dn"], with_masks=False)
    assert out["pred_ious"].shape == (2, 3, 6) and "pred_masks" not in out
    assert_close("batch copies agree", out["pred_ious"][0], out["pred_ious"][1], tol=1e-6)
    with pytest.raises(ValueError, match="position_boxes"):
        mini.head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, io["click_boxes_dn"][0])
    with pytest.raises(ValueError, match="mask_features"):
        mini.head.decode_referring(mini.tgt, mini.tgt_mask_features[0], prompt, io["click_boxes_dn"])


def test_head_is_differentiable(mini):
    """Training will backpropagate through both decodings and the prompt encoder."""
    head = mini.head
    head.zero_grad()
    prompt = head.encode_prompts(mini.ref, mini.padded("ref_mask"))
    generic = head.decode_generic(mini.tgt, mini.tgt_mask_features, prompt.label)
    refer = head.decode_referring(mini.tgt, mini.tgt_mask_features, prompt, mini.io["click_boxes_dn"])
    loss = generic["pred_logits"].sum() + generic["pred_masks"].mean() + generic["pred_boxes"].sum() \
        + refer["pred_ious"].sum() + refer["pred_masks"].mean() + refer["pred_match_score"].sum() \
        + refer["pred_boxes"].sum()
    loss.backward()
    for name in ("query_feat.weight", "content_tokens.weight", "decoder.layers.0.cross_attn.value_proj.weight", "mask_tokens.weight", "class_embed",
                 "class_embed_openset", "project_cross_attention_layers.0.multihead_attn.in_proj_weight",
                 "decoder.layers.0.self_attn.in_proj_weight", "mask_embed.layers.0.weight",
                 "iou_prediction_head.layers.0.weight", "_bbox_embed.layers.2.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    head.zero_grad()
