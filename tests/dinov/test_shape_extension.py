"""The shape extension of class matching (dinov/modeling/shape_encoder.py): known answers of its pieces, the class
logit it adds, and that without it (or without the shape part of an embedding) the content logits are unchanged."""

import dataclasses

import numpy as np
import pytest
import torch

from dinov.config import demo
from dinov.modeling.dinov import build_dinov
from dinov.modeling.shape_encoder import ShapeEncoder, square_mask_boxes
from dinov.predictor import DINOvPredictor


def shape_config(dim: int = 16):
    config = demo()
    return dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, shape_dim=dim))


def test_square_boxes_centre_the_longer_side_of_the_tight_box():
    masks = torch.zeros(2, 20, 30)
    masks[0, 2:6, 10:20] = 1.0  # 4 rows x 10 columns: a 10-sided square centred on (15, 4)
    boxes = square_mask_boxes(masks)
    assert boxes[0].tolist() == [10.0, -1.0, 20.0, 9.0]
    assert boxes[1].tolist() == [0.0, -5.0, 30.0, 25.0]  # empty: the whole map, squared


def test_shape_embeddings_ignore_position_and_scale_but_not_the_outline():
    torch.manual_seed(0)
    encoder = ShapeEncoder(dim=16)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 10 ** 2).float()
    moved = ((yy - 40) ** 2 + (xx - 44) ** 2 <= 10 ** 2).float()
    square = ((yy - 20).abs() <= 10) & ((xx - 20).abs() <= 10)
    big = F_interpolate(disc)
    with torch.no_grad():
        e = encoder(torch.stack([disc, moved, square.float(), big]))
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert float(e[0] @ e[1]) > 0.999  # translation: same crop
    assert float(e[0] @ e[3]) > 0.98  # scale: the crop is resampled to the same size
    assert float(e[0] @ e[2]) < float(e[0] @ e[1]) - 1e-3


def F_interpolate(mask: torch.Tensor) -> torch.Tensor:
    """The same disc at twice the size (on a 64x64 canvas)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    return ((yy - 32) ** 2 + (xx - 32) ** 2 <= 20 ** 2).float()


def test_the_shape_term_is_the_learned_scale_times_the_cosine():
    torch.manual_seed(0)
    model = build_dinov(shape_config()).eval()
    head = model.head
    images = torch.randn(1, 3, 96, 128)
    classes = torch.randn(1, 3, head.hidden_dim)
    shapes = torch.nn.functional.normalize(torch.randn(1, 3, 16), dim=-1)
    with torch.no_grad():
        multi_scale, mask_features = model.encode(images)
        content = head.decode_generic(multi_scale, mask_features, classes, aux=False)
        both = head.decode_generic(multi_scale, mask_features, torch.cat([classes, shapes], -1), aux=False)
        query_shapes = head.shape_encoder(content["pred_masks"][0].sigmoid())
        expected = content["pred_logits"] + head.shape_encoder.logit_scale * (query_shapes @ shapes[0].T)[None]
        assert torch.allclose(both["pred_logits"], expected, atol=1e-5)
        assert torch.equal(both["pred_boxes"], content["pred_boxes"])
        head.shape_encoder.logit_scale.fill_(0.0)
        zero = head.decode_generic(multi_scale, mask_features, torch.cat([classes, shapes], -1), aux=False)
    assert torch.allclose(zero["pred_logits"], content["pred_logits"], atol=1e-6)
    # without the shape encoder, a model is the official one: no parameter of the extension, width D only
    plain = build_dinov(demo())
    assert not any("shape_encoder" in k for k in plain.state_dict()) and plain.embedding_dim == head.hidden_dim
    with pytest.raises(ValueError):
        plain.head.decode_generic(multi_scale, mask_features, torch.cat([classes, shapes], -1))


def test_predictor_embeddings_carry_the_shape_and_say_their_form():
    from dinov.data.scenes import generate_scene

    torch.manual_seed(0)
    predictor = DINOvPredictor(build_dinov(shape_config()), device="cpu")
    plain = DINOvPredictor(build_dinov(demo()), device="cpu")
    assert predictor.embedding_form == "content+shape16" and plain.embedding_form == "content"
    scene = generate_scene(3)
    encoded = predictor.encode_image(scene.image)
    embeddings = predictor.encode_prompts(encoded, scene.masks)
    assert embeddings.shape == (len(scene.masks), predictor.model.head.hidden_dim + 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings[:, -16:], axis=1), 1.0, atol=1e-5)
    assert len(predictor.segment_referring(encoded, embeddings)) == len(scene.masks)
    found = predictor.segment_generic(encoded, [embeddings[:1], embeddings[1:2]], score_threshold=0.0)
    assert all(x.class_index in (0, 1) for x in found)


def test_start_training_trains_the_shape_encoder_of_a_model_that_has_one():
    from dinov.train.finetune import finetune_config
    from dinov.train.trainer import Trainer

    model = build_dinov(shape_config())
    config = shape_config()
    for trainable in ("decoder", "decoder+pixel_decoder", "all"):
        trainer = Trainer(model, config, finetune_config(config, trainable, steps=2))
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert all(id(p) in trained for p in model.head.shape_encoder.parameters()), trainable


def test_embedding_keys_change_with_the_embeddings_form():
    """The backend's embedding cache keys on the model's embedding form, so that a model of another form encodes
    its examples again; the official form keeps the keys it always had."""
    from types import SimpleNamespace

    from labelstudio_backend.references.sources import embedding_checkpoint

    def runtime(form: str | None):
        model = SimpleNamespace() if form is None else SimpleNamespace(embedding_form=form)
        return SimpleNamespace(checkpoint_id="abc123", load_model=lambda: model)

    assert embedding_checkpoint(runtime(None)) == "abc123"
    assert embedding_checkpoint(runtime("content")) == "abc123"
    assert embedding_checkpoint(runtime("content+shape32")) == "abc123+content+shape32"


def test_referring_adds_the_shape_term_only_with_the_prompts_shapes(monkeypatch):
    from dinov import postprocess
    from dinov.data.scenes import generate_scene

    torch.manual_seed(0)
    predictor = DINOvPredictor(build_dinov(shape_config()), device="cpu")
    scene = generate_scene(3)
    encoded = predictor.encode_image(scene.image)
    embeddings = predictor.encode_prompts(encoded, scene.masks[:2])
    passed = []
    real_filter = postprocess.filter_referring

    def recording_filter(*args, **kwargs):
        passed.append(kwargs.get("shape_logits"))
        return real_filter(*args, **kwargs)

    monkeypatch.setattr(postprocess, "filter_referring", recording_filter)
    predictor.segment_referring(encoded, embeddings)
    masks = torch.randn(5, 24, 32)
    shapes = torch.from_numpy(embeddings[:, -16:])
    with torch.no_grad():
        expected = predictor.model.head.shape_encoder.logit_scale * (
            predictor.model.head.shape_encoder(masks.sigmoid()) @ shapes.T).T
        got = passed[0](masks)
    assert got.shape == (2, 5) and torch.allclose(got, expected, atol=1e-5)
    # content-only embeddings (an older store): matched by content alone, as the official code
    content_only = DINOvPredictor(build_dinov(demo()), device="cpu")
    content_only.segment_referring(content_only.encode_image(scene.image), embeddings[:, :-16])
    assert passed[1] is None
