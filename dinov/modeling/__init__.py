"""The DINOv network, one module per part (backbone, pixel decoder, prompt encoder, decoder, heads)."""

from __future__ import annotations
