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
import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import inverse_sigmoid
from .ms_deform_attn import MSDeformAttn


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

    def embed(coord: Tensor) -> Tensor:
        pos = (coord * scale)[..., None] / dim_t
        # interleave sin of even and cos of odd frequencies
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat((embed(cy), embed(cx), embed(w), embed(h)), dim=-1)


@dataclass(frozen=True)
class QueryBlock:
    """``num_groups`` consecutive groups of ``group_size`` queries; a query attends only within its own group,
    further restricted by ``mask`` ([group_size, group_size], True = blocked) when given."""

    num_groups: int
    group_size: int
    mask: Optional[Tensor] = None

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

    blocks: Tuple[QueryBlock, ...]
    full_mask: Optional[Tensor] = None

    @property
    def num_queries(self) -> int:
        if self.full_mask is not None:
            return self.full_mask.shape[0]
        return sum(b.num_queries for b in self.blocks)

    def dense_mask(self, device: Optional[torch.device] = None) -> Tensor:
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

    def as_dense(self) -> "SelfAttentionLayout":
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

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, layout: SelfAttentionLayout) -> Tensor:
        """tgt/query_pos [B, nq, D]; reference_points [B, nq, L, 4]; memory [B, S, D] (levels low-res first)."""
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(_grouped_self_attention(self.self_attn, qk, tgt, layout)))

        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index)
        tgt = self.norm1(tgt + self.dropout1(attended))

        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
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
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("bbox_embed") and not name.startswith("norm"):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def forward(self, tgt: Tensor, reference_unsigmoid: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, layout: SelfAttentionLayout) -> Tuple[List[Tensor], List[Tensor]]:
        """Run all layers.

        tgt [B, nq, D] query contents; reference_unsigmoid [B, nq, 4] initial boxes (logits of cxcywh);
        memory [B, S, D] flattened multi-scale features (low-res level first).
        Returns (hs, references): hs[i] = norm(output of layer i) [B, nq, D]; references[i] the sigmoid boxes
        that entered layer i, references[-1] those after the last layer (num_layers + 1 entries).
        """
        if layout.num_queries != tgt.shape[1]:
            raise ValueError(f"self-attention layout covers {layout.num_queries} queries, tgt has {tgt.shape[1]}")
        n_levels = spatial_shapes.shape[0]
        output = tgt
        reference_points = reference_unsigmoid.sigmoid()
        references = [reference_points]
        hs = []
        for layer_id, layer in enumerate(self.layers):
            # padding masks are never used in inference, so every level's valid ratio is 1
            reference_input = reference_points[:, :, None, :].expand(-1, -1, n_levels, -1).contiguous()
            query_sine = sine_box_embedding(reference_points, self.d_model // 2)
            query_pos = self.ref_point_head(query_sine)
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, level_start_index, layout)

            delta = self.bbox_embed[layer_id](output)
            new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
            # boxes are refined layer by layer, but gradients do not flow through the chain (as in DINO)
            reference_points = new_reference.detach()
            references.append(new_reference)
            hs.append(self.norm(output))
        return hs, references


def flatten_multi_scale(features: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Multi-scale features (high-res first, [B, D, H_l, W_l]) -> memory [B, S, D] low-res level first,
    spatial_shapes [L, 2] (long) and level_start_index [L] (long), the layout the deformable attention expects."""
    ordered = list(features)[::-1]
    memory = torch.cat([f.flatten(2).transpose(1, 2) for f in ordered], dim=1)
    spatial_shapes = torch.as_tensor([f.shape[-2:] for f in ordered], dtype=torch.long, device=memory.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    return memory, spatial_shapes, level_start_index
