"""Stride-4 mask logits to bool masks at the image's size, as the official post-processing does (bilinear to the
padded input, crop the padding, bilinear to the original size, logit > 0).

:func:`upsample_masks` does it for whole maps; :class:`MaskResizer` does it for one mask, upsampling only the window
around its positive cells (everything outside it is provably background), with the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_masks(mask_logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Stride-4 mask logits [M, h, w] -> [M, H, W] at the image size: bilinear to the padded size, then cropped
    to the top-left image area (the padding is at the bottom/right). A mask is logit > 0."""
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [M, h, w], got {tuple(mask_logits.shape)}")
    height, width = image_size
    if height > padded_size[0] or width > padded_size[1]:
        raise ValueError(f"image_size {tuple(image_size)} is larger than padded_size {tuple(padded_size)}")
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, height, width))
    up = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]


# ------------------------------------------------------------------------- the predictor's generic path


def _axis_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (align_corners=False) source rows i0, i1 and weights w0, w1 of each output row, computed as
    PyTorch's kernel computes them (float32 source coordinates, clamped at 0 and at the last row)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0.numpy(), i1.numpy(), (1 - w1).numpy(), w1.numpy()


@dataclass
class ResizedMask:
    mask: np.ndarray  # bool [H, W] at the original image size
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the mask, x1/y1 exclusive


class MaskResizer:
    """Stride-s mask logits [h, w] -> bool mask at the original image size: bilinear to the padded input,
    crop to the resized image, bilinear to the original size, logit > 0 (the official post-processing).

    Bilinear interpolation is a convex combination of the two nearest source values on each axis, so a pixel
    can be positive only next to a positive source cell: only the window around the positive cells is
    upsampled, everything outside it is background. Within the window the first upsampling is bit-identical to
    upsampling the whole map (an integer factor maps crop coordinates to global ones exactly, and the crop keeps
    a margin so that no border clamping differs); the second is computed from PyTorch's own bilinear formula,
    equal up to float rounding. A mask whose window covers most of the image takes the whole-image path.
    """

    # Above this fraction of the resized image, windowing saves little: upsample the whole map as the official code
    # does. The second resize (to the original size) costs more per pixel in a window (gathers) than over the
    # whole image (PyTorch's kernel), hence a lower bound when there is one.
    FULL_FRACTION = 0.5
    FULL_FRACTION_RESIZED = 0.2

    def __init__(self, padded_size: tuple[int, int], input_size: tuple[int, int], image_size: tuple[int, int]):
        if input_size[0] > padded_size[0] or input_size[1] > padded_size[1]:
            raise ValueError(f"input_size {tuple(input_size)} is larger than padded_size {tuple(padded_size)}")
        self.padded_size: tuple[int, int] = (int(padded_size[0]), int(padded_size[1]))
        self.input_size: tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.resized = self.input_size != self.image_size
        if self.resized:
            self.rows = _axis_table(input_size[0], image_size[0])
            self.cols = _axis_table(input_size[1], image_size[1])

    # on a GPU: masks upsampled together, in chunks of at most this many output pixels (4 bytes each)
    DEVICE_CHUNK_PIXELS = 1 << 27

    def resize_all(self, mask_logits: Tensor) -> list[ResizedMask | None]:
        """Every mask of [M, h, w]. On the CPU one window at a time (small, cache-friendly); on a GPU the whole
        maps together, thresholded there, so that only bool masks cross to the host, once per chunk."""
        if mask_logits.device.type == "cpu":
            return [self(m) for m in mask_logits]
        return self.resize_together(mask_logits)

    def resize_together(self, mask_logits: Tensor) -> list[ResizedMask | None]:
        """The GPU path of :meth:`resize_all` (whole maps, chunk by chunk), on any device."""
        results: list[ResizedMask | None] = []
        per_mask = self.image_size[0] * self.image_size[1] + self.padded_size[0] * self.padded_size[1]
        chunk = max(1, self.DEVICE_CHUNK_PIXELS // per_mask)
        for start in range(0, mask_logits.shape[0], chunk):
            up = upsample_masks(mask_logits[start : start + chunk], self.padded_size, self.input_size)
            if self.resized:
                up = F.interpolate(up[None], size=self.image_size, mode="bilinear", align_corners=False)[0]
            for mask in (up > 0).cpu().numpy():
                results.append(_placed(mask, 0, 0, self.image_size))
        return results

    def __call__(self, logits: Tensor) -> ResizedMask | None:
        """One mask [h, w]; None when no pixel of it is positive at the image size."""
        if logits.dim() != 2:
            raise ValueError(f"mask logits must be [h, w], got {tuple(logits.shape)}")
        h, w = logits.shape
        stride = self.padded_size[0] // h
        exact = (stride * h, stride * w) == self.padded_size and stride & (stride - 1) == 0
        if not exact:  # not an integer power-of-two stride: no exact window, do it the official way
            return self._full(logits)
        in_h, in_w = self.input_size
        # source cells that reach the image area (the rest only touch the padding)
        reach_h, reach_w = min(h, -(-in_h // stride) + 1), min(w, -(-in_w // stride) + 1)
        positive = logits[:reach_h, :reach_w].numpy() > 0
        rows = np.flatnonzero(positive.any(1))
        if len(rows) == 0:
            return None  # every pixel is a convex combination of non-positive logits
        cols = np.flatnonzero(positive.any(0))
        # input pixels that can be positive: those whose bilinear footprint touches a positive cell
        y0, y1 = _reach(int(rows[0]), int(rows[-1]), stride, in_h)
        x0, x1 = _reach(int(cols[0]), int(cols[-1]), stride, in_w)
        limit = self.FULL_FRACTION_RESIZED if self.resized else self.FULL_FRACTION
        if (y1 - y0) * (x1 - x0) > limit * in_h * in_w:
            return self._full(logits)
        # one more pixel each side: the second resize interpolates between neighbours of positive pixels
        a, b, c, d = max(y0 - 1, 0), min(y1 + 1, in_h), max(x0 - 1, 0), min(x1 + 1, in_w)
        if not self.resized:
            thresholded = _upsample_window(logits, stride, a, b, c, d, positive=True)
            assert isinstance(thresholded, np.ndarray)  # positive=True thresholds on the host
            return _placed(thresholded, a, c, self.image_size)
        window = _upsample_window(logits, stride, a, b, c, d, positive=False)
        assert isinstance(window, Tensor)  # positive=False keeps the logits
        return self._resize_window(window, (a, b, c, d), (y0, y1, x0, x1))

    def _full(self, logits: Tensor) -> ResizedMask | None:
        if not self.resized:  # threshold the contiguous map, then crop (faster than the other way round)
            up = F.interpolate(logits[None, None], size=self.padded_size, mode="bilinear", align_corners=False)
            return _placed((up[0, 0].numpy() > 0)[: self.input_size[0], : self.input_size[1]], 0, 0, self.image_size)
        up = upsample_masks(logits[None], self.padded_size, self.input_size)[None]
        up = F.interpolate(up, size=self.image_size, mode="bilinear", align_corners=False)
        return _placed(up[0, 0].numpy() > 0, 0, 0, self.image_size)

    def _resize_window(self, window: Tensor, computed: tuple[int, int, int, int],
                       positive: tuple[int, int, int, int]) -> ResizedMask | None:
        a, _, c, _ = computed
        y0, y1, x0, x1 = positive
        r0, r1, rw0, rw1 = self.rows
        q0, q1, cw0, cw1 = self.cols
        # output rows/columns whose two source rows/columns touch the positive window (tables are monotone)
        top, bottom = int(np.searchsorted(r1, y0, "left")), int(np.searchsorted(r0, y1, "left"))
        left, right = int(np.searchsorted(q1, x0, "left")), int(np.searchsorted(q0, x1, "left"))
        if top >= bottom or left >= right:
            return None
        rs, cs = slice(top, bottom), slice(left, right)
        # numpy: its gathers are several times faster than torch's advanced indexing at these sizes
        win = window.numpy()
        # along the width first, once per source row (the kernel's inner sums: w0 * x[c0] + w1 * x[c1]) ...
        rows_used = slice(int(r0[top]) - a, int(r1[bottom - 1]) - a + 1)
        inner = win[rows_used]
        inner = inner[:, q0[cs] - c] * cw0[cs] + inner[:, q1[cs] - c] * cw1[cs]
        # ... then along the height, as the kernel's outer sum: w0 * inner[r0] + w1 * inner[r1]
        offset = int(r0[top])
        values = inner[r0[rs] - offset] * rw0[rs, None] + inner[r1[rs] - offset] * rw1[rs, None]
        return _placed(values > 0, top, left, self.image_size)


def _reach(first: int, last: int, stride: int, size: int) -> tuple[int, int]:
    """Output pixels [start, end) whose bilinear source pair (align_corners=False, integer ``stride``) includes
    a cell in [first, last]: source cell r is used by outputs stride*r - stride/2 ... stride*r + 3*stride/2 - 1."""
    half = stride // 2
    return max(stride * first - half, 0), min(stride * last + stride + half, size)


def _upsample_window(logits: Tensor, stride: int, a: int, b: int, c: int, d: int, positive: bool
                     ) -> Tensor | np.ndarray:
    """Rows [a, b) and columns [c, d) of ``F.interpolate(logits, scale x stride, bilinear)``, from a crop of the
    source that is large enough for no output in the window to see the crop's border clamping. With
    ``positive`` the bool array logit > 0, else the logits."""
    h, w = logits.shape
    half = stride // 2

    def crop(start: int, end: int, size: int) -> tuple[int, int]:
        # first source cell: the crop's first outputs (before `half`) are clamped, so start where they are unused
        lo = max((start - half) // stride, 0)
        # last: the pair of the window's last output must lie inside the crop, or the crop must end with the map
        hi = min(math.floor((end - 0.5) / stride - 0.5) + 2, size)
        return lo, hi

    s0, s1 = crop(a, b, h)
    t0, t1 = crop(c, d, w)
    # a contiguous crop: the kernel is a third slower on a strided one
    up = F.interpolate(logits[s0:s1, t0:t1].contiguous()[None, None], scale_factor=float(stride), mode="bilinear",
                       align_corners=False)[0, 0]
    rows, cols = slice(a - stride * s0, b - stride * s0), slice(c - stride * t0, d - stride * t0)
    if positive:  # numpy's comparison on the contiguous map, then the crop: several times faster than torch's
        return (up.numpy() > 0)[rows, cols]
    return up[rows, cols]


def _placed(window: np.ndarray, top: int, left: int, image_size: tuple[int, int]) -> ResizedMask | None:
    """A bool window placed into an empty mask of the image size, with the mask's box; None when empty.
    (numpy: its reductions over bool arrays are tens of times faster than torch's here.)"""
    rows = np.flatnonzero(window.any(1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(window.any(0))
    if window.shape == tuple(image_size):
        mask = np.ascontiguousarray(window)
    else:
        mask = np.zeros(image_size, dtype=bool)
        mask[top : top + window.shape[0], left : left + window.shape[1]] = window
    box = (float(left + cols[0]), float(top + rows[0]), float(left + cols[-1] + 1), float(top + rows[-1] + 1))
    return ResizedMask(mask=mask, box=box)
