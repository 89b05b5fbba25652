"""DINOv (Li et al., "Visual In-Context Prompting", CVPR 2024) in plain PyTorch.

The user-facing entry point is :class:`dinov.predictor.DINOvPredictor`; the network
itself lives in :mod:`dinov.modeling`, its configuration in :mod:`dinov.config`.
"""

from __future__ import annotations
