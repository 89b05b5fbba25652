"""Examples: Label Studio annotations as rows of the reference store, and the rows back as Examples.

Each region of a non-cancelled annotation becomes one row per label it carries. A region is the group of
result items sharing an ``id``: the geometry item (brush, rectangle, polygon, ellipse, keypoint, bitmask, with or
without the ``labels`` suffix) plus the labels found on any item of the group (separate Labels tags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from labelstudio_backend.labelstudio.payload import MAX_ID, ascii_id
from labelstudio_backend.labelstudio.region_types import base_type
from labelstudio_backend.store.schema import StoreError

# Bump when the way a region becomes a prompt mask changes: every cached prompt embedding is then computed again.
EMBEDDING_KEY_VERSION = "v1"

# Keys under which Label Studio keeps a task's image when the region's to_name does not match a data key.
IMAGE_KEY_FALLBACKS = ("image", "img", "url", "image_url")
URL_PREFIXES = ("http://", "https://", "/data/", "s3://", "gs://", "azure-blob://", "data:image/")

@dataclass(frozen=True)
class Example:
    """One labelled region of one annotation: an in-context example for its label."""

    annotation_id: int
    task_id: int
    region_id: str
    label: str
    region: dict  # the Label Studio result item of the region's geometry, as stored
    image_url: str  # as in the task data (/data/upload/..., http(s)://, s3://, ...)
    original_size: tuple[int, int] | None  # (original_width, original_height), Label Studio's order
    updated_at: str  # annotation's updated_at, normalised to UTC "YYYY-MM-DDTHH:MM:SS.ffffffZ"
    completed_by: int | None = None
    ground_truth: bool = False
    from_name: str = ""
    region_type: str = ""  # geometry type without the "labels" suffix: brush, rectangle, ...

    @property
    def original_width(self) -> int | None:
        return None if self.original_size is None else self.original_size[0]

    @property
    def original_height(self) -> int | None:
        return None if self.original_size is None else self.original_size[1]

    def embedding_key(self, checkpoint_id: str) -> str:
        """Cache key of this region's prompt embedding: changes with the annotation, with the weights and with
        the prompt-mask method (EMBEDDING_KEY_VERSION). The one key format of the embedding caches."""
        return "|".join([EMBEDDING_KEY_VERSION, str(self.annotation_id), str(self.region_id), str(self.updated_at),
                         checkpoint_id])


@dataclass(frozen=True)
class Row:
    """One row of the examples table (without project_id and annotation_id)."""

    region_index: int
    region_id: str
    label: str
    from_name: str
    region_type: str
    region_json: str
    image_url: str
    original_width: int | None
    original_height: int | None
    task_id: int
    completed_by: int | None
    ground_truth: int
    updated_at: str


def normalize_timestamp(value: Any) -> str | None:
    """Label Studio timestamp (ISO 8601, any offset, or a datetime) -> UTC 'YYYY-MM-DDTHH:MM:SS.ffffffZ'.

    One fixed format so that timestamps compare correctly as strings in SQL.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise StoreError(f"timestamp {value!r} is not ISO 8601 (expected e.g. 2024-05-01T12:00:00.000000Z)") from exc
    else:
        raise StoreError(f"timestamp must be an ISO 8601 string, got {type(value).__name__}")
    if moment.tzinfo is None:  # Label Studio writes UTC; a naive value is taken as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


FUTURE_SKEW_S = 300.0  # clocks differ; a timestamp further ahead than this is not believed


def clamp_future(annotation: dict, now: datetime | None = None, skew_s: float = FUTURE_SKEW_S) -> dict:
    """`annotation`, or a copy whose updated_at/created_at from the future (beyond `skew_s` seconds) are replaced
    by now: a forged `updated_at: 9999-12-31` must not win over every later genuine version."""
    now = now or datetime.now(UTC)
    limit = normalize_timestamp(now + timedelta(seconds=skew_s))
    changed = dict(annotation)
    for key in ("updated_at", "created_at"):
        try:
            stamp = normalize_timestamp(annotation.get(key))
        except StoreError:
            continue  # reported where the annotation is read
        if stamp is not None and limit is not None and stamp > limit:
            changed[key] = normalize_timestamp(now)
    return changed if changed != annotation else annotation


def as_id(value: Any, what: str) -> int:
    """An integer id (int or numeric str); StoreError naming `what` otherwise."""
    number = ascii_id(value)
    if number is None:
        raise StoreError(f"{what} must be an integer id (ASCII digits, 0 to {MAX_ID}), got {str(value)[:40]!r}")
    return number


def _user_id(completed_by: Any) -> int | None:
    # The annotation API gives an id; exports and some webhook payloads give the user object.
    if completed_by is None:
        return None
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("id")
        if completed_by is None:
            return None
    return as_id(completed_by, "annotation.completed_by")


def _labels_of(item: dict) -> list[str]:
    value = item.get("value")
    if not isinstance(value, dict):
        return []
    labels: list[str] = []
    for key, entry in value.items():
        if key.endswith("labels") and isinstance(entry, list):
            labels.extend(str(label) for label in entry if isinstance(label, (str, int, float)))
    return labels


def _geometry_type(item: dict) -> str | None:
    return base_type(item.get("type", ""))


def find_image_url(task_data: dict, to_name: str | None = None, image_key: str | None = None) -> str | None:
    """The task's image reference: data[image_key], else data[to_name], else a usual key, else the only URL."""
    for key in (image_key, to_name, *IMAGE_KEY_FALLBACKS):
        if key and isinstance(task_data.get(key), str) and task_data[key]:
            return task_data[key]
    urls = [v for v in task_data.values() if isinstance(v, str) and v.startswith(URL_PREFIXES)]
    return urls[0] if len(urls) == 1 else None


def annotation_rows(task: dict, annotation: dict, image_key: str | None = None) -> list[Row]:
    """The example rows of one annotation (empty for a cancelled one or one without labelled geometry)."""
    if not isinstance(annotation, dict):
        raise StoreError(f"annotation must be a JSON object, got {type(annotation).__name__}")
    if not isinstance(task, dict):
        raise StoreError(f"task must be a JSON object, got {type(task).__name__}")
    if annotation.get("was_cancelled"):
        return []
    task_id = task.get("id", annotation.get("task"))
    if task_id is None:
        raise StoreError("task has no 'id' (and the annotation no 'task'): cannot tell which task it labels")
    task_id = as_id(task_id, "task.id")
    data = task.get("data")
    if not isinstance(data, dict):
        raise StoreError(f"task {task_id} has no 'data' object: the image URL is read from task.data")
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise StoreError(f"annotation {annotation.get('id')}: 'result' must be a list of regions")
    updated_at = normalize_timestamp(annotation.get("updated_at") or annotation.get("created_at")) \
        or normalize_timestamp(datetime.now(UTC)) or ""
    completed_by = _user_id(annotation.get("completed_by"))
    ground_truth = int(bool(annotation.get("ground_truth")))

    # Group the items by region id: labels may sit on a separate item (a Labels tag next to a Brush tag).
    groups: dict[str, list[dict]] = {}
    for index, item in enumerate(result):
        if not isinstance(item, dict):
            raise StoreError(f"annotation {annotation.get('id')}: result[{index}] must be a JSON object")
        if item.get("type") == "relation":
            continue
        region_id = str(item.get("id") or f"item{index}")
        groups.setdefault(region_id, []).append(item)

    rows: list[Row] = []
    for region_index, (region_id, items) in enumerate(groups.items()):
        geometry = next((item for item in items if _geometry_type(item)), None)
        if geometry is None:
            continue
        labels = list(dict.fromkeys(label for item in items for label in _labels_of(item)))
        image_url = find_image_url(data, geometry.get("to_name"), image_key)
        if image_url is None:
            raise StoreError(
                f"task {task_id}: cannot tell which task.data key holds the image (keys: {sorted(data)}); "
                "name the Image tag's value after the key or pass image_key"
            )
        width, height = geometry.get("original_width"), geometry.get("original_height")
        for label in labels:
            rows.append(
                Row(
                    region_index=region_index,
                    region_id=region_id,
                    label=label,
                    from_name=str(geometry.get("from_name", "")),
                    region_type=_geometry_type(geometry) or "",
                    region_json=json.dumps(geometry, sort_keys=True, separators=(",", ":")),
                    image_url=image_url,
                    original_width=int(width) if width is not None else None,
                    original_height=int(height) if height is not None else None,
                    task_id=task_id,
                    completed_by=completed_by,
                    ground_truth=ground_truth,
                    updated_at=updated_at,
                )
            )
    return rows


ROW_COLUMNS = (
    "region_index, region_id, label, from_name, region_type, region_json, image_url, original_width, "
    "original_height, task_id, completed_by, ground_truth, updated_at"
)


def row_order(row: Row) -> tuple:
    """Sort key of rows: drawing order, then label."""
    return (row.region_index, row.label)


def row_values(row: Row) -> tuple:
    """The row's values in ROW_COLUMNS order."""
    return (
        row.region_index, row.region_id, row.label, row.from_name, row.region_type, row.region_json,
        row.image_url, row.original_width, row.original_height, row.task_id, row.completed_by, row.ground_truth,
        row.updated_at,
    )


def example_from_row(annotation_id: int, row: Row) -> Example:
    """The Example a stored row describes."""
    size = None
    if row.original_width is not None and row.original_height is not None:
        size = (int(row.original_width), int(row.original_height))
    return Example(
        annotation_id=int(annotation_id),
        task_id=int(row.task_id),
        region_id=row.region_id,
        label=row.label,
        region=json.loads(row.region_json),
        image_url=row.image_url,
        original_size=size,
        updated_at=row.updated_at,
        completed_by=row.completed_by,
        ground_truth=bool(row.ground_truth),
        from_name=row.from_name,
        region_type=row.region_type,
    )
