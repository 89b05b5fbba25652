"""The inference fusions (dinov.modeling.fused) compute what the plain layers compute, up to float rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov.modeling import fused
from dinov.modeling.pixel_decoder import MSDeformAttnEncoderLayer
from dinov.modeling.swin import SwinTransformerBlock


@pytest.fixture(autouse=True)
def one_thread():
    # the fused paths run with one torch thread (dinov.modeling.fused.inference_fusable)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fused_paths_run_with_one_thread_only() -> None:
    x = torch.zeros(2, 2)
    with torch.no_grad():
        assert fused.inference_fusable(x)
        torch.set_num_threads(2)
        assert not fused.inference_fusable(x)


@pytest.mark.parametrize("rows, block_rows", [(1, 256), (255, 256), (256, 256), (1000, 256), (1000, 7)])
def test_residual_feed_forward_equals_the_plain_layers(rows: int, block_rows: int) -> None:
    torch.manual_seed(0)
    fc1, fc2, norm_in, norm_out = nn.Linear(24, 96), nn.Linear(96, 24), nn.LayerNorm(24), nn.LayerNorm(24)
    x = torch.randn(rows, 24)
    with torch.no_grad():
        pre = x + fc2(F.gelu(fc1(norm_in(x))))
        post = norm_out(x + fc2(F.relu(fc1(x))))
        got_pre = fused.residual_feed_forward(x, fc1, fc2, fused.gelu_, norm_in=norm_in, block_rows=block_rows)
        got_post = fused.residual_feed_forward(x.clone(), fc1, fc2, torch.relu_, norm_out=norm_out,
                                               block_rows=block_rows)
        in_place = x.clone()
        fused.residual_feed_forward(in_place, fc1, fc2, fused.gelu_, norm_in=norm_in, block_rows=block_rows,
                                    out=in_place)
    torch.testing.assert_close(got_pre, pre, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_post, post, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_place, pre, rtol=0, atol=1e-5)


def _both_paths(module: nn.Module, *args) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fused_out = module(*args)
        fused.ENABLED = False
        try:
            plain_out = module(*args)
        finally:
            fused.ENABLED = True
    return fused_out, plain_out


def test_swin_block_fused_equals_plain_and_gradients_use_the_plain_path() -> None:
    torch.manual_seed(1)
    block = SwinTransformerBlock(32, 2, window_size=7, shift_size=3).eval()
    x = torch.randn(2, 9 * 11, 32)
    got, want = _both_paths(block, x.clone(), 9, 11, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # with autograd the plain path runs (no in-place work on tensors autograd needs)
    x.requires_grad_(True)
    block(x, 9, 11, None).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_pixel_decoder_encoder_layer_fused_equals_plain() -> None:
    torch.manual_seed(2)
    layer = MSDeformAttnEncoderLayer(64, 128, 0.0, n_levels=2, n_heads=4, n_points=2).eval()
    shapes = torch.tensor([[6, 8], [3, 4]])
    length = int(shapes.prod(1).sum())
    src, pos = torch.randn(2, length, 64), torch.randn(2, length, 64)
    ref = torch.rand(2, length, 2, 2)
    start = torch.tensor([0, 48])
    got, want = _both_paths(layer, src, pos, ref, shapes, start)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch, size", [(1, (23, 30)), (2, (14, 21)), (1, (7, 7))])
def test_swin_stage_with_window_gathers_equals_plain(batch: int, size: tuple[int, int]) -> None:
    # padding, shifted windows, one and two images (the fold of windows into heads for a batch)
    from dinov.modeling.swin import BasicLayer

    torch.manual_seed(3)
    layer = BasicLayer(32, 2, 2, window_size=7, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                       drop_path=[0.1, 0.1], downsample=True).eval()
    height, width = size
    x = torch.randn(batch, height * width, 32)
    got, want = _both_paths(layer, x, height, width)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert got[2:] == want[2:]


def test_autocast_and_other_dtypes_use_the_plain_layers() -> None:
    x = torch.zeros(2, 2)
    with torch.no_grad():
        assert not fused.inference_fusable(x.double())
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            assert not fused.inference_fusable(x)
