"""The inference API: encode images once, then segment them with visual prompts.

    predictor = DINOvPredictor.from_checkpoint("demo")
    reference = predictor.encode_image(reference_rgb)
    examples = predictor.encode_prompts(reference, masks)          # [N, D] prompt embeddings
    target = predictor.encode_image(target_rgb)
    instances = predictor.segment_generic(target, [examples])       # every object like the examples
    per_prompt = predictor.segment_referring(target, examples)      # the best match of each prompt
    clicked = predictor.segment_interactive(target, points=[[120, 80]], point_labels=[1]).best

Images are RGB uint8 arrays [H, W, 3] (or RGB PIL images); every coordinate and mask is at the
image's original size, whatever size the model works at (see `dinov.transforms`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinov import postprocess
from dinov.config import DINOvConfig
from dinov.interactive import (
    DrawnPrompts,
    InteractiveResult,
    choose_on_full_size,
    choose_on_logit_grid,
    stroke_sample_points,
)
from dinov.mask_upsampling import MaskResizer, upsample_masks
from dinov.modeling.box_ops import box_xyxy_to_cxcywh, grid_points, point_boxes
from dinov.modeling.dinov import DINOv
from dinov.modeling.prompt_encoder import PromptContent
from dinov.results import GenericInstances, Instance
from dinov.transforms import (
    InputError,
    ResizeConfig,
    as_rgb_uint8,
    normalize_and_pad,
    padded_size,
    resize_image,
    resize_mask,
    resized_size,
)

logger = logging.getLogger(__name__)

# A click becomes a position query: a box of +-3 px around it, as the official interactive code.
CLICK_HALF_SIZE = 3.0


@dataclass
class EncodedImage:
    """An image's features, computed once and reused for any number of prompts."""

    image_size: tuple[int, int]  # original (height, width)
    input_size: tuple[int, int]  # (height, width) after resizing, before padding
    padded_size: tuple[int, int]
    multi_scale_features: list[torch.Tensor]  # each [1, C, h, w]
    mask_features: torch.Tensor  # [1, C, H/4, W/4] of the padded input

    @property
    def scale(self) -> tuple[float, float]:
        """(y, x) factors from original pixels to model-input pixels."""
        return self.input_size[0] / self.image_size[0], self.input_size[1] / self.image_size[1]


class DINOvPredictor:
    """Runs a DINOv model on images and visual prompts. Thread-safe: model calls are serialised."""

    def __init__(
        self,
        model: DINOv,
        device: str | torch.device = "cpu",
        resize: ResizeConfig | None = None,
        autocast_dtype: torch.dtype | None = None,
        checkpoint_id: str = "unnamed",
        model_name: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # By default the size the model is made for: 800/1333 for the released models.
        self.resize = resize or ResizeConfig(shortest_edge=model.test_resize[0], max_size=model.test_resize[1])
        # Mixed precision only on CUDA; CPU runs in fp32, where bf16 is slower and less exact.
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        self.checkpoint_id = checkpoint_id
        # what predictions say made them (model_version): "demo-1a2b3c4d"; load_model names loaded models
        self.model_name = model_name or getattr(model, "model_name", None) or f"model-{checkpoint_id[:8]}"
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        config: DINOvConfig | None = None,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        resize: ResizeConfig | None = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ) -> DINOvPredictor:
        """Load `demo`, `swinT`, `swinL` (downloaded once into `cache_dir`) or a checkpoint file."""
        from dinov.build import load_model

        model, _, checkpoint_id = load_model(checkpoint, config=config, cache_dir=cache_dir)
        return cls(model, device=resolve_device(device), resize=resize, autocast_dtype=autocast_dtype,
                   checkpoint_id=checkpoint_id, model_name=model.model_name)

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @property
    def score_form(self) -> str:
        """What a generic region's score is (``postprocess.SCORE_FORMS``), from the checkpoint's metadata: the
        official class probability unless the checkpoint was calibrated with another form."""
        return str(getattr(self.model, "score_form", "class_probability"))

    @property
    def default_score_threshold(self) -> float:
        """The checkpoint's score threshold for generic segmentation (its metadata; the official 0.12 for the
        released checkpoints and models without one): what ``segment_generic`` applies when given none."""
        from dinov.build import OFFICIAL_SCORE_THRESHOLD

        return float(getattr(self.model, "default_score_threshold", OFFICIAL_SCORE_THRESHOLD))

    def _autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------- images
    def _prepare(self, image: np.ndarray | Image.Image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        rgb = as_rgb_uint8(image)
        original = (int(rgb.shape[0]), int(rgb.shape[1]))
        size = resized_size(original[0], original[1], self.resize)
        resized = resize_image(rgb, size, self.resize.image_interpolation)
        return torch.from_numpy(np.ascontiguousarray(resized).copy()).permute(2, 0, 1), original, size

    def encode_image(self, image: np.ndarray | Image.Image) -> EncodedImage:
        return self.encode_images([image])[0]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray | Image.Image], batch_size: int = 8) -> list[EncodedImage]:
        """Encode images; those of the same padded size run as one batch (padding is never shared,
        so a batched image gets exactly the features it would get alone)."""
        prepared = [self._prepare(image) for image in images]
        div = self.model.size_divisibility
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, (_, _, size) in enumerate(prepared):
            buckets.setdefault(padded_size(*size, div), []).append(index)
        results: list[EncodedImage | None] = [None] * len(prepared)
        for pad, indices in buckets.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = normalize_and_pad([prepared[i][0] for i in chunk], self.model.pixel_mean.cpu(),
                                          self.model.pixel_std.cpu(), div).to(self.device)
                with self._lock, self._autocast():
                    multi_scale, mask_features = self.model.encode(batch)
                for row, index in enumerate(chunk):
                    _, original, size = prepared[index]
                    results[index] = EncodedImage(
                        image_size=original,
                        input_size=size,
                        padded_size=pad,
                        multi_scale_features=[f[row : row + 1].float() for f in multi_scale],
                        mask_features=mask_features[row : row + 1].float(),
                    )
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------- prompts
    def _prompt_masks(self, encoded: EncodedImage, masks: np.ndarray) -> torch.Tensor:
        """Original-size bool masks [N, H, W] -> model-input masks [N, Hp, Wp] (zero padding)."""
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or len(masks) == 0:
            raise InputError(f"prompt masks must have shape [N, H, W] with N >= 1, got {masks.shape}")
        if tuple(masks.shape[1:]) != encoded.image_size:
            raise InputError(
                f"prompt masks are {masks.shape[2]}x{masks.shape[1]} but the image is "
                f"{encoded.image_size[1]}x{encoded.image_size[0]}; draw prompts at the image's original size"
            )
        out = torch.zeros(len(masks), *encoded.padded_size)
        h, w = encoded.input_size
        for i, mask in enumerate(masks.astype(bool)):
            if not mask.any():
                raise InputError(f"prompt mask {i} is empty; a prompt must cover at least one pixel")
            resized = torch.from_numpy(resize_mask(mask, encoded.input_size, self.resize.mask_interpolation))
            if not (resized > 0).any():  # a tiny prompt can vanish when the image is shrunk
                resized = F.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None], (h, w))[0]
            out[i, :h, :w] = resized
        return out.to(self.device)

    @torch.inference_mode()
    def encode_prompts(self, encoded: EncodedImage, masks: np.ndarray) -> np.ndarray:
        """Prompt embeddings of N masks on one image: float32 [N, embedding_dim]: the content queries [N, D],
        followed by the masks' shape embeddings [N, S] with a model of the shape extension."""
        prompt_masks = self._prompt_masks(encoded, masks)
        with self._lock, self._autocast():
            content = self.model.head.encode_prompts(encoded.multi_scale_features, prompt_masks)
        parts = [content.label[0]] + ([] if content.shape is None else [content.shape[0]])
        return torch.cat([p.float() for p in parts], dim=-1).cpu().numpy()

    @property
    def embedding_form(self) -> str:
        """What a prompt embedding of this model holds ("content" or "content+shapeS"): caches of embeddings key
        on it, so that a changed form is encoded again."""
        shape = self.model.head.shape_dim
        return "content" if not shape else f"content+shape{shape}"

    # ----------------------------------------------------------------- generic
    @torch.inference_mode()
    def segment_generic(
        self,
        encoded: EncodedImage,
        classes: Sequence[np.ndarray],
        score_threshold: float | None = None,
        max_instances: int = 100,
        max_examples: int = 16,
        nms_iou: float | None = postprocess.DEFAULT_NMS_IOU,
    ) -> list[Instance]:
        """Every object that looks like one of the classes. A class is given by its examples
        ([k, D] prompt embeddings; the first `max_examples` are averaged, as in the paper).

        One region per object: of regions whose masks overlap with an IoU above `nms_iou`, whatever their
        classes, only the best scoring is kept (`postprocess.mask_nms`; None keeps them all, as the official demo).

        A score is the instance's class probability (sigmoid of its similarity to the best class).
        `score_threshold=None` applies the official demo's rule with the checkpoint's default
        threshold (`default_score_threshold`: 0.12 for the released checkpoints, calibrated for
        the demo), lowered until something is found; a number keeps only instances scoring at
        least that, possibly none.
        """
        class_embeddings = self._class_bank(classes, max_examples)
        with self._lock, self._autocast():
            # Masks only for the instances that can be returned (below), not for every object query.
            outputs = self.model.head.decode_generic(
                encoded.multi_scale_features, encoded.mask_features, class_embeddings[None], with_masks=False,
                aux=False,
            )
        return self._generic_instances(outputs["pred_logits"][0].float(), outputs["mask_embed"][0].float(),
                                       encoded, score_threshold, max_instances, nms_iou)

    @torch.inference_mode()
    def generic_queries(self, encoded: EncodedImage, classes: Sequence[np.ndarray], max_examples: int = 16
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Every object query of generic decoding before any filter (for measurements): class probabilities
        float32 [Q, C] and bool masks [Q, H, W] at the original size (empty where nothing is positive)."""
        class_embeddings = self._class_bank(classes, max_examples)
        with self._lock, self._autocast():
            outputs = self.model.head.decode_generic(
                encoded.multi_scale_features, encoded.mask_features, class_embeddings[None], with_masks=False,
                aux=False,
            )
        logits = outputs["pred_logits"][0].float()
        index = torch.arange(logits.shape[0], device=logits.device)
        mask_logits = postprocess.mask_logits_of(outputs["mask_embed"][0].float(), encoded.mask_features[0].float(),
                                                 index)
        resizer = MaskResizer(encoded.padded_size, encoded.input_size, encoded.image_size)
        masks = np.zeros((len(index), *encoded.image_size), bool)
        for q, resized in enumerate(resizer.resize_all(mask_logits)):
            if resized is not None:
                masks[q] = resized.mask
        return logits.sigmoid().cpu().numpy(), masks

    def _generic_instances(self, logits: torch.Tensor, mask_embed: torch.Tensor, encoded: EncodedImage,
                           score_threshold: float | None, max_instances: int,
                           nms_iou: float | None = postprocess.DEFAULT_NMS_IOU) -> list[Instance]:
        """The post-processing of generic decoding: threshold and order the object queries first, then compute
        the masks of those that can be returned, drop duplicates (mask NMS) and upsample the rest, each only
        around its positive cells."""
        features = encoded.mask_features[0].float()
        all_masks, scores = None, None
        if self.score_form != "class_probability":  # a score that needs every query's mask
            all_masks = postprocess.mask_logits_of(mask_embed, features, torch.arange(len(mask_embed)))
            scores = postprocess.region_scores(logits, all_masks, self.score_form)[0]
        pick = postprocess.select_generic(logits, score_threshold, max_instances,
                                          default_threshold=self.default_score_threshold, scores=scores)
        instances = GenericInstances()
        if all_masks is not None and scores is not None:
            order = torch.argsort(scores, descending=True)
            candidates = order[postprocess.mask_nms(all_masks[order], postprocess.DEFAULT_NMS_IOU if nms_iou is None
                                                    else nms_iou)]
            instances.candidate_score_sum = float(scores[candidates].sum())
        if pick.index.numel() == 0:
            return instances
        mask_logits = (postprocess.mask_logits_of(mask_embed, features, pick.index) if all_masks is None
                       else all_masks[pick.index])
        scores, labels = pick.scores, pick.labels
        if nms_iou is not None and len(mask_logits) > 1:
            keep = postprocess.mask_nms(mask_logits, nms_iou)
            mask_logits, scores, labels = mask_logits[keep], scores[keep], labels[keep]
        quality = postprocess.mask_quality(mask_logits)
        resizer = MaskResizer(encoded.padded_size, encoded.input_size, encoded.image_size)
        for resized, score, label, q in zip(resizer.resize_all(mask_logits), scores.tolist(), labels.tolist(),
                                            quality.tolist()):
            if resized is not None:  # empty at the image size: never an instance
                instances.append(Instance(mask=resized.mask, score=score, class_index=label, box=resized.box,
                                          mask_quality=q))
        return instances

    def _class_bank(self, classes: Sequence[np.ndarray], max_examples: int) -> torch.Tensor:
        if len(classes) == 0:
            raise InputError("no classes given: generic segmentation needs at least one class with an example")
        rows = []
        for i, examples in enumerate(classes):
            examples = np.asarray(examples, dtype=np.float32)
            if examples.ndim == 1:
                examples = examples[None]
            if examples.ndim != 2 or examples.shape[0] == 0 or examples.shape[1] != self.embedding_dim:
                raise InputError(
                    f"class {i}: expected prompt embeddings of shape [k >= 1, {self.embedding_dim}], got {examples.shape}"
                )
            rows.append(torch.from_numpy(examples[:max_examples]).mean(0))
        return torch.stack(rows).to(self.device)

    # ----------------------------------------------------------------- referring
    @torch.inference_mode()
    def segment_referring(self, encoded: EncodedImage, prompt_embeddings: np.ndarray) -> list[Instance | None]:
        """For each prompt embedding, the one object of the target image that matches it best
        (content matching over the official 20x20 point grid); None where nothing passes."""
        embeddings = np.asarray(prompt_embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] != self.embedding_dim:
            raise InputError(f"prompt embeddings must have shape [N >= 1, {self.embedding_dim}], got {embeddings.shape}")
        content_part, shape_part = self.model.head.split_class_embeddings(torch.from_numpy(embeddings).to(self.device))
        content = PromptContent.from_labels(content_part.contiguous()[None])
        shape_logits = None
        if shape_part is not None:
            # the shape extension: the prompts' shapes against each surviving proposal's mask, as in generic decoding
            def shape_logits(masks: torch.Tensor) -> torch.Tensor:
                return self.model.head.query_shape_logits(masks[None], shape_part[None])[0].T
        grid = point_grid_boxes(self.model.points_per_side, encoded.padded_size).to(self.device)
        with self._lock, self._autocast():
            # Masks of the 2400 proposals are only needed for the few that pass NMS: the filter
            # computes those from the mask embeddings.
            outputs = self.model.head.decode_referring(
                encoded.multi_scale_features, encoded.mask_features, content, grid, with_masks=False
            )
        selection = postprocess.filter_referring(
            pred_boxes=outputs["pred_boxes"][0].float(),
            pred_ious=outputs["pred_ious"][0].float(),
            pred_match_score=outputs["pred_match_score"][0].float(),
            mask_embed=outputs["mask_embed"][0].float(),
            mask_features=encoded.mask_features[0],
            nms_threshold=self.model.nms_threshold,
            shape_logits=shape_logits,
        )
        if selection.index.numel() == 0:  # no proposal survived the filter: nothing matches
            return [None] * len(embeddings)
        resizer = MaskResizer(encoded.padded_size, encoded.input_size, encoded.image_size)
        results: list[Instance | None] = []
        for prompt_index, resized in enumerate(resizer.resize_all(selection.mask_logits.float())):
            score = float(selection.scores[prompt_index])
            results.append(None if resized is None else Instance(resized.mask, score, prompt_index, resized.box))
        return results

    # ----------------------------------------------------------------- interactive
    @torch.inference_mode()
    def segment_interactive(
        self,
        encoded: EncodedImage,
        points: np.ndarray | Sequence | None = None,
        point_labels: np.ndarray | Sequence | None = None,
        boxes: np.ndarray | Sequence | None = None,
        stroke: np.ndarray | None = None,
    ) -> InteractiveResult:
        """One object from clicks, boxes and/or a stroke drawn on this image.

        Each positive click and each box becomes a position query at its location (six
        granularity candidates each, with predicted IoUs); a stroke contributes queries at
        points along it.

        The candidate is chosen on the model's stride-4 logit grid and only the chosen one is upsampled to the
        original size (:func:`dinov.interactive.choose_on_logit_grid`); the other candidates' masks are their grid
        masks enlarged to the original size.

        The answer stays on the object the user pointed at (:func:`dinov.interactive.restrict_to_prompts`, applied to
        every candidate): a box keeps only what lies inside it; of the mask's connected parts, it keeps
        those a positive click or the stroke touches (with only a box, all parts inside it) and drops
        those a negative click touches. The chosen candidate then covers every positive click,
        overlaps the stroke most, and has the highest predicted IoU (:func:`dinov.interactive.choose_candidate`).
        """
        height, width = encoded.image_size
        prompts = DrawnPrompts.parse(points, point_labels, boxes, stroke, (height, width))
        positive, bxs, stroke = prompts.positive, prompts.boxes, prompts.stroke
        # Position queries in model-input pixels: clicks (and points along the stroke) as +-3 px
        # boxes, as the official interactive code; boxes as drawn.
        sy, sx = encoded.scale
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        clicks = np.concatenate([positive, np.asarray(stroke_sample_points(stroke, count=4)).reshape(-1, 2)]) \
            if stroke is not None else positive
        ph, pw = encoded.padded_size
        positions = torch.cat([
            point_boxes(torch.as_tensor(clicks, dtype=torch.float32).reshape(-1, 2) * scale[:2],
                        encoded.padded_size, CLICK_HALF_SIZE),
            box_xyxy_to_cxcywh(torch.as_tensor(bxs, dtype=torch.float32).reshape(-1, 4) * scale)
            / torch.tensor([pw, ph, pw, ph], dtype=torch.float32),
        ])

        # The content query only shapes match scores, not the candidates' masks or IoUs; give it
        # the drawn prompt itself so that it is meaningful.
        prompt_mask = prompts.as_mask((height, width))
        prompt_masks = self._prompt_masks(encoded, prompt_mask[None])
        with self._lock, self._autocast():
            content = self.model.head.encode_prompts(encoded.multi_scale_features, prompt_masks)
            outputs = self.model.head.decode_referring(
                encoded.multi_scale_features, encoded.mask_features, content, positions.to(self.device)
            )
        ious = outputs["pred_ious"][0].float()  # [P, 6]
        mask_logits = outputs["pred_masks"][0].float()  # [P * 6, h, w]
        to_original = lambda logits: self._mask_to_original(logits, encoded)  # noqa: E731
        return choose_on_logit_grid(mask_logits, ious, prompts, encoded.image_size, encoded.input_size, to_original) \
            or choose_on_full_size(mask_logits, ious, prompts, to_original)

    # ----------------------------------------------------------------- helpers
    def _mask_to_original(self, logits: torch.Tensor, encoded: EncodedImage) -> np.ndarray:
        """Stride-4 mask logits -> bool mask at the original size, as the official post-processing:
        bilinear to the padded input, crop the padding, bilinear to the original size, logit > 0."""
        up = upsample_masks(logits[None], encoded.padded_size, encoded.input_size)[None]
        if encoded.input_size != encoded.image_size:
            up = F.interpolate(up, size=encoded.image_size, mode="bilinear", align_corners=False)
        return (up[0, 0] > 0).cpu().numpy()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"DEVICE={device} but no CUDA device is available; use DEVICE=cpu or auto")
    return torch.device(device)


def point_grid_boxes(points_per_side: int, padded: tuple[int, int]) -> torch.Tensor:
    """The official referring position queries: an n x n grid (offset 1/(2n)) of the padded image,
    each point a box of +-3 px, cxcywh normalised by the padded size."""
    return point_boxes(grid_points(points_per_side, padded), padded, CLICK_HALF_SIZE)


