"""Where a bulk job's predictions go: Label Studio (one import request per batch) or a JSON file to import.

Label Studio 1.23.2 facts this relies on: POST /api/projects/<id>/import/predictions (a list of {"task",
"result", "score", "model_version"}) bulk-creates without touching the tasks' updated_at and answers
201 {"created": n}; a prediction whose result does not validate is dropped silently (n is smaller), and a task
id outside the project refuses the whole list (400). POST /api/predictions/ creates one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from labelstudio_backend.errors import BulkError, LabelStudioError
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient

logger = logging.getLogger(__name__)

def has_prediction(client: LabelStudioClient, task_id: int, model_version: str) -> bool:
    """Whether the task holds a prediction of this model version (asked of Label Studio now)."""
    return any(p.get("model_version") == model_version for p in client.predictions_of_task(task_id))


DONE, EXISTS, FAILED = "done", "exists", "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one task's prediction: status DONE (written), EXISTS (the task already had one of this
    version) or FAILED, and why (empty for DONE)."""

    status: str
    reason: str = ""


WRITTEN = Outcome(DONE)


class Sink(Protocol):
    """Where predictions go: write() answers an Outcome per (task, prediction) item."""

    def done_keys(self, model_version: str) -> set: ...
    def write(self, items: list[tuple[dict, dict]]) -> list[Outcome]: ...
    def close(self) -> None: ...


class LabelStudioSink:
    """Posts predictions to a project: one import request per batch, one by one to isolate a refused one.

    With check_existing, a task that meanwhile got a prediction of the same version (another job, or the
    server answering "Retrieve predictions") is left alone, so that no task gets two.
    """

    def __init__(self, client: LabelStudioClient, project_id: int, check_existing: bool = True,
                 replace: bool = False):
        self.client, self.project_id, self.check_existing = client, int(project_id), check_existing
        self.replace = replace  # a task's prediction of the same version is deleted first (a refresh)

    def done_keys(self, model_version: str) -> set:
        return set()  # the task list says which tasks hold a prediction

    def write(self, items: list[tuple[dict, dict]]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        payload, where = [], []
        for i, (task, prediction) in enumerate(items):
            if self.replace:
                self._delete_version(task["id"], prediction["model_version"])
            elif self.check_existing and has_prediction(self.client, task["id"], prediction["model_version"]):
                outcomes[i] = Outcome(EXISTS, "predicted meanwhile by another job")
                continue
            payload.append({"task": int(task["id"]), "result": prediction["result"],
                            "score": prediction.get("score"), "model_version": prediction["model_version"]})
            where.append(i)
        if payload:
            path = f"/api/projects/{self.project_id}/import/predictions"
            response = self.client.request("POST", path, json=payload)
            if response.status_code >= 500:  # Label Studio is failing, not refusing these predictions
                raise LabelStudioError(f"Label Studio answered {response.status_code} to POST {path}: "
                                       f"{response.text[:300]}", response.status_code)
            created = created_count(response)
            if created == len(payload):
                for i in where:
                    outcomes[i] = WRITTEN
            elif created is None or created:  # some were dropped, or a 201 says not how many: ask which are there
                for i, item in zip(where, payload):
                    ok = has_prediction(self.client, item["task"], item["model_version"])
                    outcomes[i] = WRITTEN if ok else Outcome(FAILED, "Label Studio dropped the prediction: its "
                                                                     "result does not validate against the labeling config")
            else:  # refused as a whole (e.g. a task deleted meanwhile): one by one, for the reasons
                for i, item in zip(where, payload):
                    outcomes[i] = self._post_one(item)
        return [o or Outcome(FAILED, "not written") for o in outcomes]

    def _delete_version(self, task_id: int, model_version: str) -> None:
        for found in self.client.predictions_of_task(task_id):
            if found.get("model_version") == model_version and found.get("id") is not None:
                response = self.client.request("DELETE", f"/api/predictions/{int(found['id'])}/")
                if response.status_code not in (204, 404):
                    raise LabelStudioError(f"Label Studio answered {response.status_code} to deleting prediction "
                                           f"{found['id']}: {response.text[:300]}", response.status_code)

    def _post_one(self, item: dict) -> Outcome:
        response = self.client.request("POST", "/api/predictions/", json=item)
        if response.status_code == 201:
            return WRITTEN
        return Outcome(FAILED, f"Label Studio refused the prediction ({response.status_code}): {response.text[:300]}")

    def close(self) -> None:
        pass


def created_count(response: Any) -> int | None:
    """n of an import's 201 {"created": n} answer; 0 for a refusal (not 201); None for a 201 whose body says not
    how many (a proxy's page): the import may have stored them all, so nothing may be posted again blindly."""
    if response.status_code != 201:
        return 0
    try:
        return int(response.json()["created"])
    except (ValueError, KeyError, AttributeError, TypeError):
        return None


class JsonSink:
    """Writes predictions to a JSON file for import instead of posting them.

    Items are appended to a journal (<out>.partial.jsonl, flushed per batch) so that an interrupted or killed
    run loses nothing and a rerun continues; close() writes <out> as one JSON list and removes the journal.
    Project mode writes {"task", "result", "score", "model_version"} (POST /api/projects/<id>/import/predictions);
    folder mode writes tasks with their predictions (the project import: POST /api/projects/<id>/import).
    """

    def __init__(self, path: Path, project_mode: bool, image_key: str = "image", replace: bool = False):
        self.path = Path(path)
        self.journal = self.path.with_name(self.path.name + ".partial.jsonl")
        self.project_mode = project_mode
        self.image_key = image_key
        self.replace = replace  # --refresh-references: the predictions written before are all made again
        self.items = self._read_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "w") as f:  # start the journal with what is kept
            for item in self.items:
                f.write(json.dumps(item) + "\n")
        self._file = open(self.journal, "a")

    def _read_existing(self) -> list[dict]:
        if self.journal.exists():
            items = []
            for line in self.journal.read_text().splitlines():
                try:
                    items.append(json.loads(line))
                except ValueError:  # a line cut by a crash
                    continue
            return items
        if self.path.exists():
            try:
                items = json.loads(self.path.read_text())
            except ValueError:
                raise BulkError(f"--out {self.path} exists and is not JSON; move it away or choose another file") \
                    from None
            if not isinstance(items, list):
                raise BulkError(f"--out {self.path} exists and is not a JSON list of predictions")
            return items
        return []

    def _key(self, item: dict) -> Any:
        if self.project_mode:
            return item.get("task")
        return (item.get("data") or {}).get(self.image_key)

    def _version(self, item: dict) -> str | None:
        if self.project_mode:
            return item.get("model_version")
        return next((p.get("model_version") for p in item.get("predictions") or []), None)

    def done_keys(self, model_version: str) -> set:
        """Keys written before with this model version. Items of another version (the job was pinned again)
        are dropped, so that the file never holds two predictions for one task."""
        kept = [] if self.replace else [i for i in self.items if self._version(i) == model_version]
        if len(kept) < len(self.items):
            logger.warning("%s: dropping %d predictions of other model versions (the references were pinned "
                           "again)", self.path, len(self.items) - len(kept))
            self.items = kept
            with open(self.journal, "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in kept)
            self._file.close()
            self._file = open(self.journal, "a")
        return {self._key(i) for i in kept}

    def write(self, items: list[tuple[dict, dict]]) -> list[Outcome]:
        for task, prediction in items:
            if self.project_mode:
                item = {"task": task["id"], **prediction}
            else:
                item = {"data": task["data"], "predictions": [prediction]}
            self.items.append(item)
            self._file.write(json.dumps(item) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return [WRITTEN] * len(items)

    def close(self) -> None:
        self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.items))
        os.replace(tmp, self.path)
        self.journal.unlink()
