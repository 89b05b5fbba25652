"""The DINOv transformer decoder: DINO-style deformable decoder layers refining box queries layer by layer.

Each query carries a content vector and a reference box; a layer does self-attention among queries, multi-scale
deformable cross-attention around the reference box, then an FFN. After each layer the shared box head refines the
reference box.

Self-attention is where the queries interact, and in DINOv most of them may not see each other: the six
granularity queries of one click/point only see each other, prompt (content) queries only see themselves. The
official code builds a dense [nq, nq] mask (2400 x 2400 for a 20x20 point grid); :class:`SelfAttentionLayout`
describes the same visibility as independent blocks so that the attention is computed block by block, with
identical results.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import inverse_sigmoid
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core


class MLP(nn.Module):
    """Linear layers with ReLU in between (none after the last). Attribute ``layers`` matches the checkpoints."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def sine_box_embedding(boxes: Tensor, dim_per_coord: int) -> Tensor:
    """Sine/cosine embedding of normalised cxcywh boxes [..., 4] -> [..., 4 * dim_per_coord], ordered (y, x, w, h)."""
    scale = 2 * math.pi
    dim_t = torch.arange(dim_per_coord, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / dim_per_coord)

    # all four coordinates at once, in the order (y, x, w, h): [..., 4, dim_per_coord]
    pos = (boxes[..., [1, 0, 2, 3]] * scale)[..., None] / dim_t
    # interleave sin of even and cos of odd frequencies
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-3)


@dataclass(frozen=True)
class QueryBlock:
    """``num_groups`` consecutive groups of ``group_size`` queries; a query attends only within its own group,
    further restricted by ``mask`` ([group_size, group_size], True = blocked) when given."""

    num_groups: int
    group_size: int
    mask: Tensor | None = None

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size


@dataclass(frozen=True)
class SelfAttentionLayout:
    """Which queries see which in self-attention.

    ``blocks`` split the queries (in order) into independent blocks; no attention crosses a block or group
    boundary. When ``full_mask`` ([nq, nq], True = blocked) is set, attention is dense with that mask instead
    (for visibilities that are not block-diagonal).
    """

    blocks: tuple[QueryBlock, ...]
    full_mask: Tensor | None = None

    @property
    def num_queries(self) -> int:
        if self.full_mask is not None:
            return self.full_mask.shape[0]
        return sum(b.num_queries for b in self.blocks)

    def dense_mask(self, device: torch.device | None = None) -> Tensor:
        """The equivalent dense [nq, nq] mask (True = blocked), as the official code builds it."""
        if self.full_mask is not None:
            return self.full_mask.to(device)
        n = self.num_queries
        mask = torch.ones(n, n, dtype=torch.bool, device=device)
        start = 0
        for block in self.blocks:
            inner = torch.zeros(block.group_size, block.group_size, dtype=torch.bool, device=device)
            if block.mask is not None:
                inner = block.mask.to(device=device, dtype=torch.bool)
            for _ in range(block.num_groups):
                end = start + block.group_size
                mask[start:end, start:end] = inner
                start = end
        return mask

    def as_dense(self) -> SelfAttentionLayout:
        return SelfAttentionLayout(blocks=self.blocks, full_mask=self.dense_mask())


def _grouped_self_attention(attn: nn.MultiheadAttention, qk: Tensor, value: Tensor, layout: SelfAttentionLayout
                            ) -> Tensor:
    """Self-attention over [B, nq, D] queries following ``layout``; the attention module is batch-first."""
    if layout.full_mask is not None:
        return attn(qk, qk, value, attn_mask=layout.full_mask.to(qk.device), need_weights=False)[0]
    batch, _, dim = qk.shape
    outputs = []
    start = 0
    for block in layout.blocks:
        end = start + block.num_queries
        # each group becomes one batch element of the attention: groups never see each other
        q = qk[:, start:end].reshape(batch * block.num_groups, block.group_size, dim)
        v = value[:, start:end].reshape(batch * block.num_groups, block.group_size, dim)
        mask = None if block.mask is None else block.mask.to(qk.device)
        out = attn(q, q, v, attn_mask=mask, need_weights=False)[0]
        outputs.append(out.reshape(batch, block.num_queries, dim))
        start = end
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def with_ones_channel(memory: Tensor) -> Tensor:
    """memory [B, S, C] -> [B, S, 1, C + 1] with a trailing channel of ones, the value table of
    :func:`deformable_cross_attention` (built once per decoding, shared by all layers)."""
    return torch.cat([memory, memory.new_ones(memory.shape[:-1] + (1,))], dim=-1)[:, :, None, :]


def deformable_cross_attention(attn: MSDeformAttn, query: Tensor, reference_boxes: Tensor, memory_ones: Tensor,
                               spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
    """What ``attn(query, boxes per level, memory, ...)`` computes, reordered to skip projecting the whole memory.

    MSDeformAttn projects every memory position (``value_proj``, S x C x C per layer: 11k positions for a
    640x864 image) and then reads a few bilinear samples per query. The projection is affine and the sampling
    linear, so the samples can be read from the raw memory and projected afterwards: each head's weighted sum of
    raw samples goes through that head's rows of ``value_proj``; the bias counts with the total weight that
    landed inside the image (outside reads zeros), which the ones channel of ``memory_ones`` measures.
    Same result up to float rounding, at a cost that scales with the queries instead of the image.

    query [B, nq, C]; reference_boxes [B, nq, 4] (cxcywh in [0, 1], the same on every level);
    memory_ones [B, S, 1, C + 1] from :func:`with_ones_channel`.
    """
    batch, num_queries, channels = query.shape
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    offsets = attn.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
    weights = attn.attention_weights(query).view(batch, num_queries, heads, levels * points)
    weights = F.softmax(weights, -1).view(batch, num_queries, heads, levels, points)
    ref = reference_boxes[:, :, None, None, None, :]
    # sampling points spread over the reference box (offsets in units of half its size / number of points)
    locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5

    # every (query, head) pair samples the raw memory as its own single-head query
    sampled = ms_deform_attn_core(memory_ones, spatial_shapes, level_start_index,
                                  locations.reshape(batch, num_queries * heads, 1, levels, points, 2),
                                  weights.reshape(batch, num_queries * heads, 1, levels, points))
    sampled = sampled.view(batch, num_queries, heads, channels + 1)
    head_dim = channels // heads
    proj_weight = attn.value_proj.weight.view(heads, head_dim, channels)
    proj_bias = attn.value_proj.bias.view(heads, head_dim)
    values = torch.einsum("bqmc,mdc->bqmd", sampled[..., :channels], proj_weight) + sampled[..., channels:] * proj_bias
    return attn.output_proj(values.reshape(batch, num_queries, channels))


class DeformableDecoderLayer(nn.Module):
    """Self-attention -> multi-scale deformable cross-attention -> FFN, each followed by residual + LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if activation != "relu":
            raise ValueError(f"only activation='relu' (the released configs) is supported, got {activation!r}")
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, layout: SelfAttentionLayout,
                memory_ones: Tensor | None = None) -> Tensor:
        """tgt/query_pos [B, nq, D]; reference_boxes [B, nq, 4] sigmoid cxcywh; memory [B, S, D] (levels low-res
        first). With ``memory_ones`` (:func:`with_ones_channel` of memory) the cross-attention projects samples
        instead of the whole memory (:func:`deformable_cross_attention`)."""
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(_grouped_self_attention(self.self_attn, qk, tgt, layout)))

        if memory_ones is not None:
            attended = deformable_cross_attention(self.cross_attn, tgt + query_pos, reference_boxes, memory_ones,
                                                  spatial_shapes, level_start_index)
        else:
            # no padding masks in inference: every level's valid ratio is 1, the box is the same on all levels
            per_level = reference_boxes[:, :, None, :].expand(-1, -1, spatial_shapes.shape[0], -1).contiguous()
            attended = self.cross_attn(tgt + query_pos, per_level, memory, spatial_shapes, level_start_index)
        tgt = self.norm1(tgt + self.dropout1(attended))

        # in place: addmm's backward does not need its output, and the FFN's hidden layer is its biggest tensor
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Stack of :class:`DeformableDecoderLayer` with iterative box refinement (state_dict: ``decoder.*``).

    ``bbox_embed`` is the head's box MLP list (one module shared by all layers in DINOv); ``norm`` is the
    head's ``decoder_norm`` (the same module, as in the checkpoints).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, norm: nn.LayerNorm, bbox_embed: nn.ModuleList,
                 d_model: int = 256) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed = bbox_embed
        self.d_model = d_model
        # cross-attention reading raw memory samples and projecting them (same result, much cheaper)
        self.project_samples = True
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("bbox_embed") and not name.startswith("norm"):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def forward(self, tgt: Tensor, reference_unsigmoid: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, layout: SelfAttentionLayout) -> tuple[list[Tensor], list[Tensor]]:
        """Run all layers.

        tgt [B, nq, D] query contents; reference_unsigmoid [B, nq, 4] initial boxes (logits of cxcywh);
        memory [B, S, D] flattened multi-scale features (low-res level first).
        Returns (hs, references): hs[i] = norm(output of layer i) [B, nq, D]; references[i] the sigmoid boxes
        that entered layer i, references[-1] those after the last layer (num_layers + 1 entries).
        """
        if layout.num_queries != tgt.shape[1]:
            raise ValueError(f"self-attention layout covers {layout.num_queries} queries, tgt has {tgt.shape[1]}")
        memory_ones = with_ones_channel(memory) if self.project_samples else None
        output = tgt
        reference_points = reference_unsigmoid.sigmoid()
        references = [reference_points]
        hs = []
        for layer_id, layer in enumerate(self.layers):
            query_sine = sine_box_embedding(reference_points, self.d_model // 2)
            query_pos = self.ref_point_head(query_sine)
            output = layer(output, query_pos, reference_points, memory, spatial_shapes, level_start_index, layout,
                           memory_ones)

            delta = self.bbox_embed[layer_id](output)
            new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
            # boxes are refined layer by layer, but gradients do not flow through the chain (as in DINO)
            reference_points = new_reference.detach()
            references.append(new_reference)
            hs.append(self.norm(output))
        return hs, references


def flatten_multi_scale(features: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-scale features (high-res first, [B, D, H_l, W_l]) -> memory [B, S, D] low-res level first,
    spatial_shapes [L, 2] (long) and level_start_index [L] (long), the layout the deformable attention expects."""
    ordered = list(features)[::-1]
    memory = torch.cat([f.flatten(2).transpose(1, 2) for f in ordered], dim=1)
    spatial_shapes = torch.as_tensor([f.shape[-2:] for f in ordered], dtype=torch.long, device=memory.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    return memory, spatial_shapes, level_start_index
