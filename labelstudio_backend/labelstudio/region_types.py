"""The region types the backend understands, in their "...labels" form (one list for every module).

A <Brush> tag next to a <Labels> tag gives results of type "brush"; `base_type` maps both forms to the
geometry name ("brush", "rectangle", ...).
"""

from __future__ import annotations

OUTPUT_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")      # predictions are written into these
PROMPT_ONLY_TYPES = ("keypointlabels", "ellipselabels", "bitmasklabels")  # only read as prompts or examples
REGION_TYPES = OUTPUT_TYPES + PROMPT_ONLY_TYPES


def base_type(kind: str) -> str | None:
    """'brushlabels' or 'brush' -> 'brush'; None for a type that carries no usable geometry."""
    kind = str(kind).lower()
    base = kind[: -len("labels")] if kind.endswith("labels") else kind
    return base if base + "labels" in REGION_TYPES else None
