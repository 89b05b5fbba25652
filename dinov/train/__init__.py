"""Training DINOv: matching, losses (and, from the model side, the training loop)."""

from __future__ import annotations
