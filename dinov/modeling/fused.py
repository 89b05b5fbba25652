"""Inference-only fusions of row-wise layers, computed in row blocks that stay in the CPU's cache.

A transformer's feed-forward network and the norms and residual additions around it work on each token (row)
alone, so they can run block by block: the wide hidden activations of one block ([rows, hidden], a few hundred
kilobytes) are written and read back while still in cache instead of going through main memory, and every
elementwise step (bias, activation, residual, norm) runs on cached data. The results equal the unfused layers
up to float rounding (a bias is added before or after the product instead of inside it).

These functions do in-place work on their own temporaries and are meant for inference (autograd off); the
modules fall back to their plain forward when gradients are needed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows per block: enough for the matrix products to run at full speed, few enough that a block's hidden
# activations (rows x 4C or rows x 2048 floats) stay in a core's L2 cache.
DEFAULT_BLOCK_ROWS = 256

# False runs the plain layers everywhere (for comparing both paths in one process: dinov.tools.bench --unfused).
ENABLED = True


def inference_fusable(*tensors: Tensor) -> bool:
    """Fused paths run when no gradient is recorded, the tensors are on the CPU (on CUDA the plain layers
    already run at the device's speed and these Python loops would only add launches) and torch uses one thread:
    with two threads on a loaded machine the many small products (one synchronisation of the threads each) were
    slower than the plain layers (pixel decoder 20.0 s against 13.4 s wall clock, load 6-7; see BENCHMARKS.md)."""
    return (ENABLED and not torch.is_grad_enabled() and torch.get_num_threads() == 1
            and not torch.is_autocast_enabled("cpu")  # mixed precision: the plain layers, as autocast casts them
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def residual_feed_forward(
    x: Tensor,
    fc1: nn.Linear,
    fc2: nn.Linear,
    activation_: Callable[[Tensor], Tensor],
    norm_in: nn.LayerNorm | None = None,
    norm_out: nn.LayerNorm | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    out: Tensor | None = None,
) -> Tensor:
    """``y = x + fc2(act(fc1(norm_in(x))))``, then ``norm_out(y)``, for x [rows, C], block by block.

    ``activation_`` is an in-place activation (``torch.relu_``, ``torch.ops.aten.gelu_``); ``norm_in`` /
    ``norm_out`` are optional LayerNorms (pre-norm blocks use the first, post-norm layers the second).
    ``out`` may be given (a [rows, C] tensor, possibly ``x`` itself: every block is read before it is written).
    """
    if x.dim() != 2:
        raise ValueError(f"residual_feed_forward takes [rows, C], got shape {tuple(x.shape)}")
    out = torch.empty_like(x) if out is None else out
    w1, w2 = fc1.weight.t(), fc2.weight.t()
    for start in range(0, x.shape[0], block_rows):
        rows = x[start : start + block_rows]
        inp = _layer_norm(rows, norm_in) if norm_in is not None else rows
        hidden = torch.addmm(fc1.bias, inp, w1) if fc1.bias is not None else inp @ w1
        activation_(hidden)
        target = out[start : start + block_rows]
        if norm_out is None and target.data_ptr() == rows.data_ptr():
            target.addmm_(hidden, w2)  # in place: the block was read above
        elif norm_out is None:
            torch.addmm(rows, hidden, w2, out=target)
        else:
            y = torch.addmm(rows, hidden, w2)
            if fc2.bias is not None:
                y += fc2.bias
            target.copy_(_layer_norm(y, norm_out))
            continue
        if fc2.bias is not None:
            target += fc2.bias
    return out


def residual_linear_norm(
    x: Tensor, inp: Tensor, proj: nn.Linear, norm: nn.LayerNorm, block_rows: int = DEFAULT_BLOCK_ROWS
) -> Tensor:
    """``norm(x + proj(inp))`` for x [rows, C] and inp [rows, C_in], block by block."""
    out = torch.empty_like(x)
    w = proj.weight.t()
    for start in range(0, x.shape[0], block_rows):
        y = torch.addmm(x[start : start + block_rows], inp[start : start + block_rows], w)
        if proj.bias is not None:
            y += proj.bias
        out[start : start + block_rows] = _layer_norm(y, norm)
    return out


def gelu_(x: Tensor) -> Tensor:
    """In-place exact GELU (``nn.GELU()``'s default, erf form)."""
    return torch.ops.aten.gelu_(x)
