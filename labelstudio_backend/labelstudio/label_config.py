"""What the backend needs from a project's labeling config, parsed with label-studio-sdk.

The backend works on one Image object tag. Controls pointing to it:

- output controls, that predictions are written into: BrushLabels (masks as RLE), PolygonLabels
  (a polygon traced from the mask), RectangleLabels (the mask's box);
- prompt-only controls: KeyPointLabels and EllipseLabels (and the output controls too: a box or a
  stroke drawn in any of them is a prompt).

A label of a prompt is written into the first output control (in config order) that has the same label,
so the usual smart-tool config (BrushLabels + KeyPointLabels + RectangleLabels with the same labels) works.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from labelstudio_backend.labelstudio.region_types import OUTPUT_TYPES, REGION_TYPES


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend; the message says what to add or fix."""


@dataclass(frozen=True)
class Control:
    name: str              # from_name of its regions
    type: str              # lower-case region type, e.g. "brushlabels"
    labels: tuple[str, ...]
    smart: bool

    @property
    def is_output(self) -> bool:
        return self.type in OUTPUT_TYPES


@dataclass(frozen=True)
class ParsedConfig:
    image_name: str        # to_name of the regions
    value_key: str         # key of the image URL in task["data"]
    controls: tuple[Control, ...]

    @property
    def output_controls(self) -> tuple[Control, ...]:
        return tuple(c for c in self.controls if c.is_output)

    @property
    def output_labels(self) -> tuple[str, ...]:
        """Every label an output control can write, in config order, without duplicates."""
        seen: dict[str, None] = {}
        for control in self.output_controls:
            seen.update(dict.fromkeys(control.labels))
        return tuple(seen)

    def control(self, name: str) -> Control | None:
        return next((c for c in self.controls if c.name == name), None)

    def output_for(self, label: str) -> Control:
        """The control a region of `label` is written into."""
        for control in self.output_controls:
            if label in control.labels:
                return control
        raise LabelConfigError(
            f"label {label!r} is not in any BrushLabels, PolygonLabels or RectangleLabels of the labeling config "
            f"(their labels: {', '.join(self.output_labels) or 'none'}); add it there or draw with a known label")

    def image_url(self, task: dict) -> str:
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            raise LabelConfigError(f"task {_task_id(task)} has no 'data' object")
        url = data.get(self.value_key)
        if not isinstance(url, str) or not url:
            raise LabelConfigError(
                f"task {_task_id(task)} has no image under data[{self.value_key!r}] (the Image tag's value "
                f"${self.value_key}); its data keys are {sorted(data)}")
        return url


def parse_label_config(config: str) -> ParsedConfig:
    """Parse a labeling config; LabelConfigError if it has no Image tag or no supported control."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the labeling config is empty; Label Studio sends it as 'label_config' or 'schema'")
    return _parse_cached(config)


@functools.lru_cache(maxsize=64)
def _parse_cached(config: str) -> ParsedConfig:
    try:
        interface = LabelInterface(config)
    except Exception as e:  # the SDK raises several exception types for broken XML
        raise LabelConfigError(f"the labeling config is not valid XML: {e}") from None

    images = {obj.name: obj for obj in (interface.objects or []) if obj.tag.lower() == "image"}
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag; this backend segments images")

    controls_by_image: dict[str, list[Control]] = {name: [] for name in images}
    for tag in interface.controls or []:
        kind = tag.tag.lower()
        if kind not in REGION_TYPES:
            continue
        for to_name in tag.to_name:
            if to_name in controls_by_image:
                controls_by_image[to_name].append(Control(
                    name=tag.name, type=kind, labels=tuple(tag.labels),
                    smart=str(tag.attr.get("smart", "")).lower() == "true"))

    # The first image that has an output control; multi-image configs use that one.
    for name, controls in controls_by_image.items():
        if any(c.is_output for c in controls):
            value = images[name].value or ""
            if not value.startswith("$") or len(value) < 2:
                raise LabelConfigError(
                    f"<Image name={name!r}> has value={value!r}; it must name a task field, e.g. value=\"$image\"")
            for control in controls:
                if not control.labels:
                    raise LabelConfigError(f"<{control.type} name={control.name!r}> has no <Label> children")
            return ParsedConfig(image_name=name, value_key=value[1:], controls=tuple(controls))

    found = sorted({c.type for cs in controls_by_image.values() for c in cs})
    raise LabelConfigError(
        "the labeling config has no BrushLabels, PolygonLabels or RectangleLabels control on an <Image> "
        f"(found: {', '.join(found) or 'no supported control'}); add one so predictions have somewhere to go "
        "(KeyPointLabels and EllipseLabels are used as prompts only)")


def _task_id(task: object) -> str:
    return str(task.get("id")) if isinstance(task, dict) else "?"
