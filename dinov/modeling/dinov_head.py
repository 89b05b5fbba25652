"""The DINOv decoder head (official ``sem_seg_head.predictor``, ``dinov_openset_decoder``).

It turns the pixel decoder's outputs into segmentation proposals in two ways:

* generic (open-set) decoding: ``num_queries`` learned object queries plus one content query per class; each
  object query gets a mask, a box and a similarity logit to every class (:meth:`DINOvHead.decode_generic`);
* referring decoding: each position box (a click, or a point of a grid) becomes ``num_interactive_tokens``
  queries, one per granularity; each gets a mask, a box, a predicted IoU and a match score to every visual
  prompt (:meth:`DINOvHead.decode_referring`).

The content queries of visual prompts come from :meth:`DINOvHead.encode_prompts`.

Attribute names equal the official state_dict keys so the released checkpoints load as they are. The forward is
differentiable (no in-place ops on activations, no ``no_grad``). The one training-only path is the denoising
queries of generic decoding (``decode_generic(denoising_boxes=...)``); without them the forward is the inference one.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .box_ops import inverse_sigmoid
from .decoder import (
    MLP,
    DeformableDecoder,
    DeformableDecoderLayer,
    QueryBlock,
    SelfAttentionLayout,
    flatten_multi_scale,
)
from .prompt_encoder import (
    CrossAttentionLayer,
    PromptContent,
    content_attention_mask,
    prompt_mask_pyramid,
    visible_cells,
    whole_image_box,
)
from .shape_encoder import ShapeEncoder

# pb_embedding index used for every prompt in the released inference code
_PROMPT_PB_INDEX = 1
# label_enc index used for every prompt/position query (the official code only ever uses 0)
_PROMPT_LABEL_INDEX = 0


class DINOvHead(nn.Module):
    """DINOv decoder head.

    Args (official config names in brackets):
        hidden_dim: query/feature width [DECODER.HIDDEN_DIM].
        num_queries: learned object queries for generic decoding [DECODER.NUM_OBJECT_QUERIES].
        nheads: heads of the prompt encoder's cross-attention [DECODER.NHEADS].
        dim_feedforward: decoder FFN width [DECODER.DIM_FEEDFORWARD].
        dec_layers: decoder layers [DECODER.DEC_LAYERS].
        mask_dim: width of the mask features [ENCODER.MASK_DIM].
        dim_proj: width of the similarity projections [DIM_PROJ].
        total_num_feature_levels: multi-scale feature levels [DECODER.TOTAL_NUM_FEATURE_LEVELS].
        num_interactive_tokens: granularity queries per position box [DECODER.NUM_INTERACTIVE_TOKENS].
        num_content_tokens: content queries per visual prompt [DECODER.NUM_CONTENT_TOKENS]; only 1 is supported
            (the official inference code is only defined for 1).
        content_independent: content queries do not see the object queries in generic decoding
            [DECODER.CONTENT_INDEPENDENT].
        dropout: dropout of the decoder and prompt encoder (0 in the released configs).
        dec_n_points: sampling points per head and level of the deformable attention.
        decoder_nheads: heads of the decoder layers (the official code always uses 8, whatever NHEADS says).
        shape_dim: width of the shape embeddings of the shape extension (``shape_encoder.ShapeEncoder``; not in the
            official model); 0, the released models, computes exactly what the official code computes.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_queries: int = 300,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        dim_proj: int = 512,
        total_num_feature_levels: int = 4,
        num_interactive_tokens: int = 6,
        num_content_tokens: int = 1,
        content_independent: bool = True,
        dropout: float = 0.0,
        dec_n_points: int = 4,
        decoder_nheads: int = 8,
        shape_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_content_tokens != 1:
            raise ValueError(f"num_content_tokens must be 1 (the only value the official inference supports), "
                             f"got {num_content_tokens}")
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = total_num_feature_levels
        self.num_mask_tokens = num_interactive_tokens
        self.num_content_tokens = num_content_tokens
        self.content_independent = content_independent

        # learned object queries (content and initial box logits) for generic decoding
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, 4)

        # query embeddings of position (click/grid) and content (visual prompt) queries
        self.label_enc = nn.Embedding(2, hidden_dim)
        self.pb_embedding = nn.Embedding(2, hidden_dim)
        self.mask_tokens = nn.Embedding(num_interactive_tokens, hidden_dim)

        # visual-prompt encoder
        self.content_tokens = nn.Embedding(num_content_tokens, hidden_dim)
        self.pos_embed = nn.Embedding(num_content_tokens, hidden_dim)
        self.project_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=0.0) for _ in range(total_num_feature_levels))

        # decoder; its final norm and box head are shared with the head, as in the checkpoints
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self._bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        last = self._bbox_embed.layers[-1]
        assert isinstance(last, nn.Linear)  # MLP's layers are Linear
        nn.init.constant_(last.weight, 0.0)
        nn.init.constant_(last.bias, 0.0)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * dec_layers)
        layer = DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, "relu", total_num_feature_levels,
                                       decoder_nheads, dec_n_points)
        self.decoder = DeformableDecoder(layer, dec_layers, self.decoder_norm, self.bbox_embed, d_model=hidden_dim)

        # output heads
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.iou_prediction_head = MLP(hidden_dim, hidden_dim, 1, 3)
        # similarity projections: class_embed for referring, class_embed_openset for generic decoding;
        # class_embed_part is unused by DINOv but part of the checkpoints
        self.class_embed = nn.Parameter(torch.empty(hidden_dim, dim_proj))
        self.class_embed_part = nn.Parameter(torch.empty(hidden_dim, dim_proj))
        self.class_embed_openset = nn.Parameter(torch.empty(hidden_dim, dim_proj))
        for p in (self.class_embed, self.class_embed_part, self.class_embed_openset):
            nn.init.trunc_normal_(p, std=0.02)
        # the shape extension: only models trained with it have these parameters
        self.shape_dim = shape_dim
        self.shape_encoder = ShapeEncoder(shape_dim) if shape_dim > 0 else None

    @property
    def embedding_dim(self) -> int:
        """Width of a class embedding: the content label, then (shape extension) the shape embedding."""
        return self.hidden_dim + self.shape_dim

    def split_class_embeddings(self, class_embeddings: Tensor) -> tuple[Tensor, Tensor | None]:
        """[..., C, D (+ S)] -> (content labels [..., C, D], shape embeddings [..., C, S] or None). Embeddings
        without the shape part (width D) are matched by content alone."""
        if self.shape_encoder is not None and class_embeddings.shape[-1] == self.embedding_dim:
            return class_embeddings[..., : self.hidden_dim], class_embeddings[..., self.hidden_dim:]
        return class_embeddings, None

    # ------------------------------------------------------------------ inputs

    def _check_features(self, multi_scale_features: Sequence[Tensor]) -> int:
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} multi-scale feature maps (highest resolution "
                             f"first), got {len(multi_scale_features)}")
        batch = multi_scale_features[0].shape[0]
        for i, f in enumerate(multi_scale_features):
            if f.dim() != 4 or f.shape[1] != self.hidden_dim or f.shape[0] != batch:
                raise ValueError(f"multi-scale feature {i} must be [B={batch}, {self.hidden_dim}, H, W], "
                                 f"got {tuple(f.shape)}")
        return batch

    def _check_mask_features(self, mask_features: Tensor, batch: int) -> None:
        if mask_features.dim() != 4 or mask_features.shape[0] != batch:
            raise ValueError(f"mask_features must be [B={batch}, mask_dim, H/4, W/4], got {tuple(mask_features.shape)}")

    def _prompt_query_embedding(self) -> Tensor:
        # the query embedding every position/content query starts from (label 0, prompt flag 1)
        return self.label_enc.weight[_PROMPT_LABEL_INDEX] + self.pb_embedding.weight[_PROMPT_PB_INDEX]

    # ------------------------------------------------------------------ prompt encoder

    def encode_prompts(self, multi_scale_features: Sequence[Tensor], prompt_masks: Tensor) -> PromptContent:
        """Content queries of N visual prompts drawn on ONE image.

        multi_scale_features: the image's pixel-decoder features, highest resolution first, each [1, D, h, w].
        prompt_masks: [N, H_pad, W_pad] prompt masks (> 0 inside) zero-padded to the padded image size.
        """
        batch = self._check_features(multi_scale_features)
        if batch != 1:
            raise ValueError(f"encode_prompts takes the features of one image (batch 1), got batch {batch}")
        if prompt_masks.dim() != 3 or prompt_masks.shape[0] == 0:
            raise ValueError(f"prompt_masks must be [N>=1, H_pad, W_pad], got {tuple(prompt_masks.shape)}")
        finest = multi_scale_features[0]
        pad_h, pad_w = prompt_masks.shape[-2:]
        fine_h, fine_w = finest.shape[-2:]
        if pad_h % fine_h or pad_w % fine_w or pad_h // fine_h != pad_w // fine_w:
            raise ValueError(f"prompt_masks ({pad_h}x{pad_w}) must be zero-padded to the padded image size, a whole "
                             f"multiple of the finest feature map ({fine_h}x{fine_w}) with the same stride on both axes")
        num_prompts = prompt_masks.shape[0]
        feature_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in multi_scale_features]
        level_masks = prompt_mask_pyramid(prompt_masks.to(finest.device), feature_sizes)

        tokens = self.content_tokens.weight[None].expand(1, num_prompts, -1)
        query_pos = self.pos_embed.weight[None].expand(1, num_prompts, -1)
        # coarsest level first
        for layer, feature, mask in zip(self.project_cross_attention_layers, multi_scale_features[::-1],
                                        level_masks[::-1]):
            memory = feature.flatten(2).transpose(1, 2)
            memory, mask = visible_cells(memory, mask)
            tokens = layer(tokens, memory, memory_mask=mask, query_pos=query_pos)

        label = self._prompt_query_embedding()[None, None] + tokens
        bbox = whole_image_box(num_prompts, label)
        shape = None
        if self.shape_encoder is not None:
            shape = self.shape_encoder((prompt_masks > 0).to(finest.device).float())[None]
        return PromptContent(label=label, bbox=bbox, attn_mask=content_attention_mask(num_prompts, label.device),
                             shape=shape)

    # ------------------------------------------------------------------ generic decoding

    def decode_generic(self, multi_scale_features: Sequence[Tensor], mask_features: Tensor, class_embeddings: Tensor,
                       with_masks: bool = True, aux_masks: bool = False, aux: bool = True,
                       denoising_boxes: Tensor | None = None, denoising_groups: int = 1) -> dict[str, Any]:
        """Generic (open-set) decoding of B target images against C classes.

        class_embeddings: [1, C, D] (or [B, C, D]) content labels, one per class (a class with several examples
            uses the mean of their labels, see ``prompt_encoder.mean_content_label``); with the shape extension
            [1 or B, C, D + S], each label followed by the class's (mean) shape embedding: the cosine similarity of
            the class's shape to each object query's predicted mask, times the learned scale, is added to the
            logits of every layer whose masks are computed (all of them then, whatever ``with_masks``).
        with_masks: compute ``pred_masks``; ``mask_embed`` [B, Q, mask_dim] is always returned, so the masks of
            the queries kept by the filter can be computed later instead (``postprocess.filter_generic``).
        aux_masks: also predict masks after every earlier layer (for training).
        denoising_boxes: training only: [B, G * S, 4] noised ground-truth boxes (cxcywh in [0, 1]), ``denoising_groups``
            (G) groups of S queries. They become extra queries (content ``label_enc[0]``, as the official DN) placed
            before the object queries; each group attends only within itself and no other query attends to them, so
            the object and class queries compute exactly what they compute without them. Their predictions come
            back under "denoising" (pred_boxes, pred_masks, pred_logits and aux_outputs, masks on every layer).
        aux: compute the earlier layers' predictions at all (``aux_outputs`` is empty without; inference needs
            only the last layer's).
        Returns pred_logits [B, Q, C] (similarity logits; == pred_match_score), pred_masks [B, Q, H/4, W/4]
        (last layer), pred_boxes [B, Q, 4] (cxcywh normalised to the padded size), pred_match_score, mask_embed,
        and aux_outputs: one dict per earlier layer with pred_logits, pred_boxes, pred_match_score (and
        pred_masks when ``aux_masks``).
        """
        batch = self._check_features(multi_scale_features)
        self._check_mask_features(mask_features, batch)
        if class_embeddings.dim() != 3 or class_embeddings.shape[-1] not in (self.hidden_dim, self.embedding_dim) \
                or class_embeddings.shape[0] not in (1, batch) or class_embeddings.shape[1] == 0:
            raise ValueError(f"class_embeddings must be [1 or B, C>=1, {self.hidden_dim}"
                             f"{'' if self.shape_encoder is None else f' or {self.embedding_dim}'}], "
                             f"got {tuple(class_embeddings.shape)}")
        class_embeddings, class_shapes = self.split_class_embeddings(class_embeddings)
        num_classes = class_embeddings.shape[1]
        num_generic = self.num_queries
        memory, spatial_shapes, level_start_index = flatten_multi_scale(multi_scale_features)

        tgt = torch.cat([self.query_feat.weight[None].expand(batch, -1, -1),
                         class_embeddings.to(memory).expand(batch, -1, -1)], dim=1)
        refs = torch.cat([self.query_embed.weight[None].expand(batch, -1, -1),
                          whole_image_box(num_classes, memory).expand(batch, -1, -1)], dim=1)
        layout = self._generic_layout(num_classes, memory.device)
        num_dn = 0
        if denoising_boxes is not None:
            num_dn = denoising_boxes.shape[1]
            if denoising_boxes.shape != (batch, num_dn, 4) or num_dn % denoising_groups:
                raise ValueError(f"denoising_boxes must be [B={batch}, G*S, 4] with G={denoising_groups} groups, "
                                 f"got {tuple(denoising_boxes.shape)}")
            dn_content = self.label_enc.weight[0].to(memory)[None, None].expand(batch, num_dn, -1)
            tgt = torch.cat([dn_content, tgt], dim=1)
            refs = torch.cat([inverse_sigmoid(denoising_boxes.to(memory)), refs], dim=1)
            layout = with_denoising_block(layout, denoising_groups, num_dn // denoising_groups)
        hs, references = self.decoder(tgt, refs, memory, spatial_shapes, level_start_index, layout)

        outputs, dn_outputs = [], []
        for i, h in enumerate(hs):
            last = i == len(hs) - 1
            if not (last or aux):
                continue
            normed = self.decoder_norm(h)
            projected = normed @ self.class_embed_openset
            classes = projected[:, num_dn + num_generic:]
            # similarity of each object query to each class query
            logits = projected[:, num_dn:num_dn + num_generic] @ classes.transpose(1, 2)
            generic_hs = h[:, num_dn:num_dn + num_generic]
            boxes = (self.bbox_embed[i](generic_hs)
                     + inverse_sigmoid(references[i][:, num_dn:num_dn + num_generic])).sigmoid()
            out = {"pred_logits": logits, "pred_boxes": boxes, "pred_match_score": logits}
            if last or aux_masks:
                mask_embed = self.mask_embed(normed[:, num_dn:num_dn + num_generic])
                if last:
                    out["mask_embed"] = mask_embed
                if with_masks or not last or class_shapes is not None:
                    out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
                if class_shapes is not None:
                    logits = logits + self.query_shape_logits(out["pred_masks"], class_shapes)
                    out["pred_logits"] = out["pred_match_score"] = logits
            outputs.append(out)
            if num_dn:
                dn_boxes = (self.bbox_embed[i](h[:, :num_dn]) + inverse_sigmoid(references[i][:, :num_dn])).sigmoid()
                dn_embed = self.mask_embed(normed[:, :num_dn])
                dn_outputs.append({"pred_logits": projected[:, :num_dn] @ classes.transpose(1, 2),
                                   "pred_boxes": dn_boxes,
                                   "pred_masks": torch.einsum("bqc,bchw->bqhw", dn_embed, mask_features)})
        result: dict[str, Any] = dict(outputs[-1])  # tensors by name, and the auxiliary and denoising outputs
        result["aux_outputs"] = outputs[:-1]
        if num_dn:
            result["denoising"] = dict(dn_outputs[-1], aux_outputs=dn_outputs[:-1])
        return result

    def query_shape_logits(self, pred_masks: Tensor, class_shapes: Tensor) -> Tensor:
        """Shape extension: [B, Q, C] learned scale x cosine similarity of each query's predicted mask (its
        probabilities, not back-propagated into the mask) to each class's shape embedding."""
        if self.shape_encoder is None:
            raise ValueError("query_shape_logits needs the shape extension (a head built with a shape encoder)")
        b, q = pred_masks.shape[:2]
        probs = pred_masks.detach().float().sigmoid().flatten(0, 1)
        shapes = self.shape_encoder(probs).view(b, q, -1)
        return self.shape_encoder.similarity_logits(shapes, class_shapes).to(pred_masks.dtype)

    def _generic_layout(self, num_classes: int, device: torch.device) -> SelfAttentionLayout:
        n = self.num_queries
        if self.content_independent:
            # object queries see each other; each class query sees only itself
            return SelfAttentionLayout(blocks=(QueryBlock(1, n), QueryBlock(num_classes, 1)))
        # class queries also see the object queries (not block-diagonal: dense with a mask)
        total = n + num_classes
        mask = torch.ones(total, total, dtype=torch.bool, device=device)
        mask[:n, :n] = False
        mask[n:, :n] = False
        mask[n:, n:] = content_attention_mask(num_classes, device)
        return SelfAttentionLayout(blocks=(), full_mask=mask)

    # ------------------------------------------------------------------ referring decoding

    def decode_referring(self, multi_scale_features: Sequence[Tensor], mask_features: Tensor, prompt: PromptContent,
                         position_boxes: Tensor, with_masks: bool = True, dense_attention: bool = False
                         ) -> dict[str, Tensor]:
        """Referring decoding: P position boxes x ``num_interactive_tokens`` (K) granularities, matched to N prompts.

        prompt: content queries of the N visual prompts (``encode_prompts``; may come from another image).
        position_boxes: [P, 4] cxcywh normalised to the padded size (a 20x20 grid of small boxes proposes every
            object in the image; click boxes give interactive segmentation).
        with_masks: compute ``pred_masks`` (the biggest output, [B, P*K, H/4, W/4]); ``mask_embed``
            [B, P*K, mask_dim] is always returned, so masks of selected proposals can be computed later.
        dense_attention: compute self-attention with the official dense mask (slow; for checking equivalence).
        Returns pred_masks [B, P*K, H/4, W/4], pred_ious [B, P, K], pred_match_score [B, N, P*K] (== pred_logits),
        pred_boxes [B, P*K, 4], mask_embed. Proposals are position-major: proposal p*K + k is box p, granularity k.
        """
        batch = self._check_features(multi_scale_features)
        self._check_mask_features(mask_features, batch)
        if position_boxes.dim() != 2 or position_boxes.shape[-1] != 4 or position_boxes.shape[0] == 0:
            raise ValueError(f"position_boxes must be [P>=1, 4] normalised cxcywh, got {tuple(position_boxes.shape)}")
        label, content_bbox, content_mask = prompt.label, prompt.bbox, prompt.attn_mask
        if label.dim() != 3 or label.shape[0] != 1 or label.shape[-1] != self.hidden_dim:
            raise ValueError(f"prompt.label must be [1, N, {self.hidden_dim}], got {tuple(label.shape)}")
        num_content = label.shape[1]
        if content_bbox.shape != (1, num_content, 4) or content_mask.shape != (num_content, num_content):
            raise ValueError(f"prompt.bbox must be [1, {num_content}, 4] and prompt.attn_mask [{num_content}, "
                             f"{num_content}], got {tuple(content_bbox.shape)} and {tuple(content_mask.shape)}")
        num_tokens = self.num_mask_tokens
        memory, spatial_shapes, level_start_index = flatten_multi_scale(multi_scale_features)
        num_position = position_boxes.shape[0] * num_tokens

        # one query per (box, granularity): shared prompt embedding + the granularity's token
        position_label = self._prompt_query_embedding()[None, None] + self.mask_tokens.weight[None]  # [1, K, D]
        position_label = position_label.expand(position_boxes.shape[0], -1, -1).reshape(1, num_position, -1)
        position_ref = inverse_sigmoid(position_boxes.to(memory)).repeat_interleave(num_tokens, dim=0)[None]

        tgt = torch.cat([position_label, label.to(memory)], dim=1).expand(batch, -1, -1)
        refs = torch.cat([position_ref, content_bbox.to(memory)], dim=1).expand(batch, -1, -1)
        # position queries see only the other granularities of their own box; prompts follow their own mask;
        # the two sets never see each other
        layout = SelfAttentionLayout(blocks=(QueryBlock(position_boxes.shape[0], num_tokens),
                                             QueryBlock(1, num_content, content_mask.to(memory.device))))
        if dense_attention:
            layout = layout.as_dense()
        hs, references = self.decoder(tgt, refs, memory, spatial_shapes, level_start_index, layout)

        # only the last layer's predictions are returned by the official inference, so only they are computed
        last = hs[-1]
        normed = self.decoder_norm(last)
        projected = normed @ self.class_embed
        match_score = projected[:, num_position:] @ projected[:, :num_position].transpose(1, 2)
        position_out = normed[:, :num_position]
        ious = self.iou_prediction_head(position_out).squeeze(-1).reshape(batch, -1, num_tokens)
        # the box head sees the twice-normalised output here (unlike in generic decoding), as in the official
        boxes = (self.bbox_embed[-1](position_out) + inverse_sigmoid(references[-2][:, :num_position])).sigmoid()
        mask_embed = self.mask_embed(position_out)
        out = {"pred_logits": match_score, "pred_match_score": match_score, "pred_ious": ious,
               "pred_boxes": boxes, "mask_embed": mask_embed}
        if with_masks:
            out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return out


def with_denoising_block(layout: SelfAttentionLayout, num_groups: int, group_size: int) -> SelfAttentionLayout:
    """``layout`` with ``num_groups`` denoising groups of ``group_size`` queries put in front: a denoising query
    sees only its own group and no query of ``layout`` sees it (isolated both ways, so that the noised ground
    truth cannot leak into the matching part nor the matching part into the denoising)."""
    if layout.full_mask is None:
        return SelfAttentionLayout(blocks=(QueryBlock(num_groups, group_size),) + tuple(layout.blocks))
    num_dn = num_groups * group_size
    total = num_dn + layout.full_mask.shape[0]
    mask = torch.ones(total, total, dtype=torch.bool, device=layout.full_mask.device)
    for g in range(num_groups):
        start = g * group_size
        mask[start:start + group_size, start:start + group_size] = False
    mask[num_dn:, num_dn:] = layout.full_mask
    return SelfAttentionLayout(blocks=(), full_mask=mask)
