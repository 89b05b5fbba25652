import numpy as np
import pytest
import torch
from PIL import Image

from dinov import config, prompts
from dinov.transforms import (
    InputError,
    ResizeConfig,
    as_rgb_uint8,
    normalize_and_pad,
    resize_mask,
    resized_size,
)


def test_resized_size_follows_shorter_side_and_cap():
    resize = ResizeConfig(shortest_edge=800, max_size=1333)
    assert resized_size(480, 640, resize) == (800, 1067)
    # A very wide image is capped by its longer side.
    assert resized_size(100, 1000, resize) == (133, 1333)
    assert resized_size(640, 853, ResizeConfig(shortest_edge=640, max_size=None)) == (640, 853)


def test_normalize_and_pad_pads_after_normalisation():
    image = torch.full((3, 33, 40), 255, dtype=torch.uint8)
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    batch = normalize_and_pad([image], mean, std, 32)
    assert batch.shape == (1, 3, 64, 64)
    assert torch.allclose(batch[0, :, 0, 0], (255 - mean) / std)
    assert torch.all(batch[0, :, 33:, :] == 0) and torch.all(batch[0, :, :, 40:] == 0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((10, 10), np.uint8), "RGB"),
        (np.zeros((10, 10, 4), np.uint8), "RGB"),
        (np.zeros((10, 10, 3), np.uint16), "8-bit"),
        (Image.new("RGBA", (10, 10)), "RGB"),
    ],
)
def test_bad_images_are_refused_with_a_reason(bad, message):
    with pytest.raises(InputError, match=message):
        as_rgb_uint8(bad)


def test_prompt_rasterisation_shapes_and_areas():
    size = (100, 120)
    box = prompts.box_to_mask((10, 20, 29, 39), size)
    assert box.shape == size and box.sum() == 20 * 20
    disc = prompts.points_to_mask([(50, 50)], size, radius=10)
    assert abs(int(disc.sum()) - np.pi * 100) < 40 and disc[50, 50]
    poly = prompts.polygon_to_mask([(0, 0), (99, 0), (0, 99)], size)
    assert abs(int(poly.sum()) - 5050) < 150
    stroke = prompts.stroke_to_mask([(10, 50), (110, 50)], size, width=5)
    assert stroke[50, 10:111].all() and not stroke[40].any()
    ellipse = prompts.ellipse_to_mask(60, 50, 30, 10, 90, size)
    # Rotated by 90 degrees the long axis is vertical.
    ys, xs = np.nonzero(ellipse)
    assert (ys.max() - ys.min()) > 2.5 * (xs.max() - xs.min())
    assert abs(int(ellipse.sum()) - np.pi * 300) < 60


def test_bad_prompts_are_refused():
    with pytest.raises(InputError):
        prompts.box_to_mask((10, 10, 5, 20), (50, 50))
    with pytest.raises(InputError):
        prompts.polygon_to_mask([(0, 0), (1, 1)], (50, 50))
    with pytest.raises(InputError):
        prompts.points_to_mask([], (50, 50))


def test_nearest_mask_resize_stays_binary():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:7] = True
    out = resize_mask(mask, (25, 25), "nearest")
    assert set(np.unique(out)) <= {0.0, 1.0} and out.sum() > 0


def test_reference_configs_parse(reference_dir):
    mini_t = config.from_official_overrides(reference_dir / "miniT_config.json")
    assert mini_t.swin.embed_dim == 32 and mini_t.swin.window_size == 7
    assert mini_t.pixel_decoder.encoder_in_features == ("res3", "res4", "res5")
    assert mini_t.pixel_decoder.dim_feedforward == 128 and mini_t.decoder.dec_layers == 3
    mini_l = config.from_official_overrides(reference_dir / "miniL_config.json")
    assert mini_l.pixel_decoder.total_num_feature_levels == 5 and mini_l.decoder.total_num_feature_levels == 5
    assert config.DINOvConfig.from_dict(mini_l.to_dict()) == mini_l
