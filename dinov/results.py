"""What segmentation returns: regions with their class (or prompt) index, score, box and mask quality."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Instance:
    mask: np.ndarray  # bool [H, W] at the original size
    score: float
    class_index: int  # index of the class (generic) or of the prompt (referring)
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the mask, pixels, x1/y1 exclusive
    # generic: the mean probability of the stride-4 mask over its positive cells (how sure the mask is of itself)
    mask_quality: float | None = None


class GenericInstances(list):
    """segment_generic's regions (a list of Instance), with ``candidate_score_sum``: the summed scores of every
    candidate region (one per object after mask NMS, at any score) when the score form computes every query's
    mask, else None; ``postprocess.prediction_score`` turns both into an image's score."""

    candidate_score_sum: float | None = None
