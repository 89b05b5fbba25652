"""Swin Transformer backbone, laid out as DINOv (Mask2Former style) uses it.

The module tree reproduces the official state_dict names (``patch_embed``, ``layers.i.blocks.j``,
``layers.i.downsample``, ``norm0..norm3``), so the released checkpoints load without renaming.
``forward`` takes a normalised, padded image batch [B, 3, H, W] and returns ``{"res2": ..., "res5": ...}``
at strides 4, 8, 16 and 32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from .fused import gelu_, inference_fusable, residual_feed_forward

# The shifted-window mask blocks attention between tokens of different image regions with this additive value
# (a finite number, not -inf, as in the official implementation; softmax makes both practically zero).
_SHIFT_MASK_VALUE = -100.0


class Mlp(nn.Module):
    """Two-layer feed-forward network of a Swin block."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] -> [B * num_windows, window_size * window_size, C], windows of one image consecutive."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: -> [B, height, width, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """[N, N] index (N = window_size**2) into a (2*window_size-1)**2 table of relative offsets."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # offsets shifted to start at 0
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> Tensor:
    """Additive mask [num_windows, N, N] for a map of (padded) size height x width after a cyclic shift.

    After rolling by -shift_size, a window at the bottom/right edge mixes tokens from up to three bands per
    axis that were not neighbours in the image; tokens may only attend within their own band pair.
    """

    def bands(length: int) -> Tensor:
        idx = torch.arange(length, device=device)
        return (idx >= length - window_size).long() + (idx >= length - shift_size).long()

    region = bands(height)[:, None] * 3 + bands(width)[None, :]  # [H, W] region id
    region_windows = window_partition(region[None, :, :, None].float(), window_size).squeeze(-1)  # [nW, N]
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, _SHIFT_MASK_VALUE)


class WindowLayout:
    """Where each token of a height x width map goes in (shifted) windows, as two gather indices.

    ``to_windows`` [Hp * Wp]: for each position of the padded, cyclically shifted, window-partitioned map
    (the order of :func:`window_partition` after ``torch.roll(-shift)``), the token it reads (0 for padding,
    listed in ``padding``); ``to_tokens`` [H * W]: for each token, its position in that order. A pad, a roll and
    a partition (three copies of the map) become one row gather, and their inverses another.
    """

    def __init__(self, height: int, width: int, window_size: int, shift_size: int, device: torch.device) -> None:
        ws = window_size
        hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
        tokens = torch.full((hp, wp), -1, dtype=torch.long, device=device)
        tokens[:height, :width] = torch.arange(height * width, device=device).view(height, width)
        if shift_size > 0:
            tokens = torch.roll(tokens, shifts=(-shift_size, -shift_size), dims=(0, 1))
        order = window_partition(tokens[None, :, :, None], ws).reshape(-1)
        valid = order >= 0
        self.padding = torch.nonzero(~valid).view(-1)
        self.to_windows = order.clamp(min=0)
        self.to_tokens = torch.empty(height * width, dtype=torch.long, device=device)
        self.to_tokens[order[valid]] = torch.nonzero(valid).view(-1)
        self.num_positions = hp * wp


def _batched(index: Tensor, batch: int, stride: int) -> Tensor:
    """A per-image row index repeated for ``batch`` images of ``stride`` rows each."""
    if batch == 1:
        return index
    return (torch.arange(batch, device=index.device)[:, None] * stride + index[None]).view(-1)


class WindowAttention(nn.Module):
    relative_position_index: Tensor  # a persistent buffer

    """Multi-head self-attention inside square windows, with a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent: the released checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B * nW, N, C] windows (nW consecutive windows per image); mask: [nW, N, N] additive or None."""
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)[None]  # [1, heads, N, N]
        if mask is not None and mask.shape[0] == bw:
            # One image: the [nW, heads, N, N] mask lines up with the windows as they are (no copies of q, k, v;
            # the output stays in [windows, N, heads, head_dim] memory order, so the reshape below is free).
            bias = bias + mask[:, None].to(bias.dtype)
        elif mask is not None:
            # Fold the windows into the head axis so that one [nW*heads, N, N] mask broadcasts over the batch.
            nw = mask.shape[0]
            bias = (bias + mask[:, None].to(bias.dtype)).reshape(1, nw * heads, n, n)
            q, k, v = (t.reshape(bw // nw, nw * heads, n, c // heads) for t in (q, k, v))

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.view(bw, heads, n, c // heads).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-norm residual. Works on [B, H*W, C] tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        # Stochastic depth per sample; an identity in eval mode.
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self, x: Tensor, height: int, width: int, shift_mask: Tensor | None, layout: WindowLayout | None = None
    ) -> Tensor:
        """x: [B, H*W, C] tokens; ``layout`` (for this map size and this block's shift) enables the gather path
        at inference."""
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"got {length} tokens for a {height}x{width} feature map")
        if layout is not None and inference_fusable(x) and not (self.training and not isinstance(self.drop_path, nn.Identity)):
            return self._forward_gathered(x, shift_mask, layout)
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)

        # Pad (after the norm, with zeros) to whole windows; padded tokens take part as keys like in the official
        # model, they are not masked.
        pad_b = (ws - height % ws) % ws
        pad_r = (ws - width % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), mask=shift_mask if self.shift_size > 0 else None)
        x = window_reverse(windows, ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))

        x = x[:, :height, :width, :].reshape(b, height * width, c)
        x = shortcut + self.drop_path(x)
        if inference_fusable(x) and isinstance(self.mlp.act, nn.GELU) and self.mlp.act.approximate == "none":
            # Inference: norm, MLP and residual in cached row blocks (x is this block's own temporary).
            x2d = x.view(-1, c)
            residual_feed_forward(x2d, self.mlp.fc1, self.mlp.fc2, gelu_, norm_in=self.norm2, block_rows=512,
                                  out=x2d)
            return x
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_gathered(self, x: Tensor, shift_mask: Tensor | None, layout: WindowLayout) -> Tensor:
        """The same block at inference with the window layout as row gathers: norm, one gather into (shifted,
        padded) windows, attention, one gather back, the residual added in place, and the fused MLP."""
        b, length, c = x.shape
        normed = self.norm1(x).view(b * length, c)
        windows = normed.index_select(0, _batched(layout.to_windows, b, length))
        if layout.padding.numel():
            # Padding is zeros after the norm (it takes part as keys, like in the official model).
            windows.index_fill_(0, _batched(layout.padding, b, layout.num_positions), 0.0)
        windows = windows.view(-1, self.window_size * self.window_size, c)
        attended = self.attn(windows, mask=shift_mask if self.shift_size > 0 else None)
        out = attended.view(b * layout.num_positions, c).index_select(0, _batched(layout.to_tokens, b,
                                                                                  layout.num_positions))
        out += x.view(b * length, c)
        if isinstance(self.mlp.act, nn.GELU) and self.mlp.act.approximate == "none":
            residual_feed_forward(out, self.mlp.fc1, self.mlp.fc2, gelu_, norm_in=self.norm2, block_rows=512, out=out)
            return out.view(b, length, c)
        out = out.view(b, length, c)
        return out + self.mlp(self.norm2(out))


class PatchMerging(nn.Module):
    """Halves the resolution: concatenates each 2x2 neighbourhood (4C) and projects it to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))  # odd sizes get a zero row/column
        # The channel order (top-left, bottom-left, top-right, bottom-right) is what the weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    """One Swin stage: blocks alternating regular and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """Returns (stage output [B, H*W, C], input of the next stage, its height, its width)."""
        ws = self.window_size
        hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
        shift_mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device).to(x.dtype)
        layouts: dict[int, WindowLayout] = {}
        if inference_fusable(x):
            layouts = {shift: WindowLayout(height, width, ws, shift, x.device) for shift in {0, self.shift_size}}
        blocks: list[SwinTransformerBlock] = list(self.blocks)  # type: ignore[arg-type]  # a ModuleList of them
        for blk in blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, height, width, shift_mask, use_reentrant=False)
            else:
                x = blk(x, height, width, shift_mask, layouts.get(blk.shift_size))
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim channels (optionally layer-normed)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        _, _, h, w = x.shape
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)  # [B, C, H/p, W/p]
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinTransformer(nn.Module):
    """Hierarchical Swin backbone returning normalised features ``res{i+2}`` for each stage i in out_indices."""

    # DINOv pads its images to a multiple of this (patch size 4 x three 2x poolings).
    size_divisibility = 32

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have the same length")
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed: nn.Parameter | None = None
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # Stochastic depth rate grows linearly over all blocks of all stages.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depths[i]],
                    downsample=i < self.num_layers - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        names = [f"res{i + 2}" for i in self.out_indices]
        self.out_feature_channels: dict[str, int] = {n: self.num_features[i] for n, i in zip(names, self.out_indices)}
        self.out_feature_strides: dict[str, int] = {n: patch_size * 2**i for n, i in zip(names, self.out_indices)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: normalised image batch [B, in_chans, H, W] -> {"res2": [B, C, H/4, W/4], ..., "res5": ...}."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        height, width = x.shape[2:]
        if self.absolute_pos_embed is not None:
            x = x + F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))

        outs: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            stage_out, x, next_h, next_w = layer(x, height, width)
            if i in self.out_indices:
                feat = getattr(self, f"norm{i}")(stage_out).view(-1, height, width, self.num_features[i])
                outs[f"res{i + 2}"] = feat.permute(0, 3, 1, 2)
            height, width = next_h, next_w
        if not outs:
            # No normed outputs requested: expose the raw last stage, as the official model does.
            last = self.num_features[-1]
            outs["res5"] = stage_out.view(-1, height, width, last).permute(0, 3, 1, 2).contiguous()
        return outs


def build_swin_tiny(drop_path_rate: float = 0.3) -> SwinTransformer:
    """Swin-T as in DINOv's released Swin-T model (window 7, pretrained at 224)."""
    return SwinTransformer(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, pretrain_img_size=224,
        drop_path_rate=drop_path_rate,
    )


def build_swin_large(drop_path_rate: float = 0.3) -> SwinTransformer:
    """Swin-L as in DINOv's released Swin-L model (window 12, pretrained at 384)."""
    return SwinTransformer(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, pretrain_img_size=384,
        drop_path_rate=drop_path_rate,
    )
