"""Folder mode: predict a folder of images without Label Studio, from the annotations of a Label Studio JSON export.

    python -m labelstudio_backend.bulk --images photos/ --references export.json --out tasks.json

The export's annotations fill a reference store of the job's own; each image becomes a task (an image the
export shows keeps that task's id, so it is never predicted from its own annotation); --out receives tasks with
their predictions, for Label Studio's project import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labelstudio_backend.bulk.options import OFFLINE_PROJECT_ID
from labelstudio_backend.errors import BulkError
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.labelstudio.payload import task_id_of
from labelstudio_backend.settings import Settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class FolderImages:
    """Images from local folders, for runs without Label Studio: task images by their URL in the task data,
    reference images (URLs of an export: /data/upload/..., /data/local-files/?d=...) by file name."""

    settings: Settings
    task_files: dict[str, str]  # task data URL -> file path
    reference_dirs: tuple[str, ...]

    def load(self, url: str, task_id: int | None = None) -> np.ndarray:
        return ImageLoader(self.settings).decode(self.fetch(url, task_id), url)

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        from dinov.data.labelstudio_export import find_image

        path = self.task_files.get(url)
        if path is None:
            errors = []
            for folder in self.reference_dirs:
                try:
                    path = str(find_image(url, folder))
                    break
                except FileNotFoundError as e:
                    errors.append(str(e))
            if path is None:
                raise FileNotFoundError("; ".join(errors) or f"image {url!r} not found")
        size = os.path.getsize(path)
        if size > self.settings.max_image_bytes:
            raise ValueError(f"{path}: {size} bytes, above MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
        with open(path, "rb") as f:
            return f.read()


def load_export(path: Path) -> list[dict]:
    """The tasks of a Label Studio JSON export (BulkError unless it is one with annotations)."""
    try:
        tasks = json.loads(Path(path).read_text())
    except OSError as e:
        raise BulkError(f"--references {path}: cannot read it ({e})") from None
    except ValueError as e:
        raise BulkError(f"--references {path} is not JSON ({e}); give a Label Studio JSON export") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BulkError(f"--references {path} is not a Label Studio JSON export (a list of tasks)")
    if not any(t.get("annotations") for t in tasks):
        raise BulkError(f"--references {path} has no annotations; export a project with annotated tasks")
    return tasks


EXPORT_TAGS = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels", "rectanglelabels": "RectangleLabels",
         "keypointlabels": "KeyPointLabels", "ellipselabels": "EllipseLabels"}


def label_config_from_export(tasks: list[dict]) -> str:
    """A labeling config with the controls, labels and image key the export's regions use."""
    controls: dict[tuple[str, str, str], dict[str, None]] = {}
    to_names: dict[str, None] = {}
    for task in tasks:
        for annotation in task.get("annotations") or []:
            for item in annotation.get("result") or []:
                kind = str(item.get("type", "")).lower()
                if kind not in EXPORT_TAGS:
                    continue
                key = (kind, str(item.get("from_name", "label")), str(item.get("to_name", "image")))
                labels = controls.setdefault(key, {})
                labels.update(dict.fromkeys(str(v) for v in (item.get("value") or {}).get(kind) or []))
                to_names[key[2]] = None
    if not controls:
        raise BulkError("the export's annotations have no labeled brush, polygon, rectangle, keypoint or ellipse "
                        "regions; pass --label-config with the project's labeling config")
    image = next(iter(to_names))
    data: dict = next((t["data"] for t in tasks if isinstance(t.get("data"), dict)), {})
    value = image if image in data else next((k for k, v in data.items() if isinstance(v, str)), "image")
    if not any(kind in ("brushlabels", "polygonlabels", "rectanglelabels") for kind, _, _ in controls):
        labels = dict.fromkeys(label for found in controls.values() for label in found)
        controls[("brushlabels", "dinov_masks", image)] = labels  # somewhere for the predictions to go
    lines = [f'<View>\n  <Image name="{_xml(image)}" value="${_xml(value)}"/>']
    for (kind, name, to_name), labels in controls.items():
        if to_name != image:
            continue
        inner = "".join(f'<Label value="{_xml(label)}"/>' for label in labels)
        lines.append(f'  <{EXPORT_TAGS[kind]} name="{_xml(name)}" toName="{_xml(to_name)}">{inner}</{EXPORT_TAGS[kind]}>')
    return "\n".join(lines + ["</View>"])


def _xml(text: str) -> str:
    return str(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def fill_store_from_export(store: Any, tasks: list[dict], image_key: str, project_id: int = OFFLINE_PROJECT_ID) -> None:
    """The export's non-cancelled annotations become the store's examples (and only they)."""
    present = set()
    for task in tasks:
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict) or annotation.get("was_cancelled") or "id" not in annotation:
                continue
            store.upsert_annotation(project_id, task, annotation, image_key=image_key)
            present.add(int(annotation["id"]))
    gone = [a for a in store.annotation_versions(project_id) if a not in present]
    if gone:
        store.delete_annotations(project_id, gone)


def folder_tasks(images_dir: Path, image_key: str, url_prefix: str, export: list[dict],
                 reference_dirs: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """One task per image under images_dir (sorted): data[image_key] = url_prefix + relative path. An image
    that an export task shows keeps that task's id, so it is never predicted from its own annotation."""
    from dinov.data.labelstudio_export import find_image

    if not images_dir.is_dir():
        raise BulkError(f"--images {images_dir} is not a folder")
    exported: dict[str, dict] = {}
    for task in export:
        reference = (task.get("data") or {}).get(image_key)
        if not isinstance(reference, str):
            continue
        for folder in reference_dirs:
            try:
                exported[str(find_image(reference, folder).resolve())] = task
                break
            except FileNotFoundError:
                continue
    tasks: list[dict] = []
    files: dict[str, str] = {}
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(images_dir).as_posix()
        url = url_prefix + relative
        source = exported.get(str(path.resolve()))
        labeled = bool(source and any(not a.get("was_cancelled") for a in source.get("annotations") or []))
        tasks.append({"id": task_id_of(source.get("id")) if source else None, "key": url,
                      "data": {image_key: url}, "labeled": labeled, "versions": []})
        files[url] = str(path)
    if not tasks:
        raise BulkError(f"--images {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return tasks, files
