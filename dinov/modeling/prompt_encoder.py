"""Visual-prompt (content) encoder pieces: a prompt mask becomes one content query.

A learned content token cross-attends to the image's multi-scale features, level by level from the coarsest,
seeing only the feature cells the prompt mask covers (a prompt too small to cover any cell at a level sees the
whole level). The head (``dinov_head.DINOvHead.encode_prompts``) owns the parameters (``content_tokens``,
``pos_embed``, ``project_cross_attention_layers``) under the checkpoint's names and calls these helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import inverse_sigmoid


@dataclass
class PromptContent:
    """Content queries of N visual prompts, ready to be appended to the decoder's queries.

    label: [1, N, D] query embeddings; bbox: [1, N, 4] initial boxes as logits (inverse sigmoid of the whole
    image box (0, 0, 1, 1) in cxcywh); attn_mask: [N, N] self-attention mask among them (True = blocked: each
    prompt sees only itself); shape: [1, N, S] shape embeddings of the prompt masks, only from a model with the
    shape extension (``shape_encoder``), else None.
    """

    label: Tensor
    bbox: Tensor
    attn_mask: Tensor
    shape: Tensor | None = None

    @property
    def num_prompts(self) -> int:
        return self.label.shape[1]

    @classmethod
    def from_labels(cls, label: Tensor) -> PromptContent:
        """Content queries from stored prompt embeddings [1, N, D] (the box and mask are the same for all)."""
        if label.dim() != 3 or label.shape[0] != 1 or label.shape[1] == 0:
            raise ValueError(f"label must be [1, N>=1, D], got {tuple(label.shape)}")
        n = label.shape[1]
        return cls(label=label, bbox=whole_image_box(n, label), attn_mask=content_attention_mask(n, label.device))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention block: tgt = norm(tgt + MHA(tgt + query_pos, memory, memory))."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        """tgt [B, N, D], memory [B, S, D], memory_mask [N, S] or [B * nhead, N, S] (True = blocked)."""
        query = tgt if query_pos is None else tgt + query_pos
        attended = self.multihead_attn(query, memory, memory, attn_mask=memory_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(attended))


def prompt_mask_pyramid(prompt_masks: Tensor, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Cross-attention masks of N prompts for each feature level.

    prompt_masks: [N, H_pad, W_pad] (any numeric dtype, > 0 = inside the prompt) on the padded image.
    feature_sizes: (h, w) of the multi-scale features, highest resolution first.
    Returns one bool mask [N, h * w] per level, highest resolution first (True = the token may not look there).

    The prompt is shrunk by successive bilinear halvings from the padded size down to the finest feature
    level, then from level to level, as the official code does; a cell is visible when the shrunk mask is > 0.
    A prompt that covers no cell of a level is allowed to see the whole level.
    """
    pad_h, pad_w = prompt_masks.shape[-2:]
    finest_h = feature_sizes[0][0]
    # intermediate halvings between the image and the finest level (e.g. /2, /4 before a stride-8 level)
    num_halvings = int(math.log(int(pad_h / finest_h), 2))
    sizes = [(int(pad_h / 2 ** i), int(pad_w / 2 ** i)) for i in range(1, num_halvings)]
    sizes += [(int(s[0]), int(s[1])) for s in feature_sizes]

    current = prompt_masks[None].float()
    shrunk = []
    for size in sizes:
        current = F.interpolate(current, size=size, mode="bilinear", align_corners=False)
        shrunk.append(current)

    masks = []
    for level_mask in shrunk[len(sizes) - len(feature_sizes):]:
        blocked = level_mask[0].flatten(1) <= 0
        fully_blocked = blocked.all(dim=-1, keepdim=True)
        masks.append(blocked & ~fully_blocked)
    return masks


def visible_cells(memory: Tensor, blocked: Tensor) -> tuple[Tensor, Tensor]:
    """The cells of one level that at least one prompt may see: memory [1, S, D] and its mask [N, S] (True =
    blocked) -> [1, S', D] and [N, S'].

    A blocked cell gets exactly zero attention weight, so leaving out the cells no prompt sees changes nothing
    but float rounding, and the key and value projections then cost what the prompts cover instead of the whole
    level (a click covers a few cells of thousands).
    """
    seen = ~blocked.all(0)
    if bool(seen.all()):
        return memory, blocked
    index = seen.nonzero()[:, 0]
    return memory.index_select(1, index), blocked.index_select(1, index)


def whole_image_box(n: int, like: Tensor) -> Tensor:
    """[1, n, 4] initial boxes of content queries: the whole image, as logits (inverse sigmoid of cxcywh)."""
    box = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=like.dtype, device=like.device)
    return inverse_sigmoid(box).expand(1, n, 4)


def content_attention_mask(num_prompts: int, device: torch.device | None = None) -> Tensor:
    """[N, N] self-attention mask of N content queries: each sees only itself (True = blocked)."""
    return ~torch.eye(num_prompts, dtype=torch.bool, device=device)


def mean_content_label(labels: Sequence[Tensor]) -> Tensor:
    """One class from several in-context examples: the mean of their content labels (each [1, 1, D]) -> [1, 1, D].

    This is how the official demo combines examples of one class.
    """
    if len(labels) == 0:
        raise ValueError("mean_content_label needs at least one example label")
    return torch.stack(list(labels)).mean(0)
