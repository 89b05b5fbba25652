"""What a bulk job is asked to do: its options, and which tasks it predicts (task id ranges, skipped tasks).

Label Studio's task list (GET /api/projects/<id>/tasks/, newest updated_at first, 404 past the last page) is
read once, before anything is written, by `list_project_tasks`.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from labelstudio_backend.errors import BulkError
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.labelstudio.payload import task_id_of, task_key

logger = logging.getLogger(__name__)

OFFLINE_PROJECT_ID = 0          # the project id of the reference store built from an export


@dataclass
class BulkOptions:
    """A job, as the command line gives it (cli.py documents each option)."""

    project: int | None = None
    images: Path | None = None
    references: Path | None = None
    reference_images: tuple[str, ...] = ()
    url_prefix: str = ""
    label_config: str | None = None
    extra_params: Any = None
    only_unlabeled: bool = False
    task_ids: list[tuple[int, int]] | None = None
    refresh_references: bool = False
    batch_size: int = 8
    workers: int = 4
    page_size: int = 100
    out: Path | None = None
    report: Path | None = None
    progress: bool = True
    ray: str | None = None  # None: local; "": a local Ray instance (or RAY_ADDRESS); else the cluster address
    replicas: int | None = None
    cpus_per_replica: float = 1.0


def parse_task_ids(text: str) -> list[tuple[int, int]]:
    """'100-200,305,400-' -> [(100, 200), (305, 305), (400, max)]: inclusive ranges of task ids."""
    ranges = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            start = int(low) if low.strip() else 0
            end = (int(high) if high.strip() else sys.maxsize) if dash else start
        except ValueError:
            raise BulkError(f"--task-ids {text!r}: {part!r} is not a task id or a range like 100-200") from None
        if end < start:
            raise BulkError(f"--task-ids {text!r}: the range {part!r} ends before it starts")
        ranges.append((start, end))
    if not ranges:
        raise BulkError(f"--task-ids {text!r} names no task; give ids or ranges such as 100-200,305")
    return ranges


def in_ranges(task_id: Any, ranges: Sequence[tuple[int, int]] | None) -> bool:
    """Whether the task id lies in one of the inclusive ranges (every task when there are none)."""
    if not ranges:
        return True
    value = task_id_of(task_id)
    return value is not None and any(start <= value <= end for start, end in ranges)


def select_tasks(tasks: Iterable[dict], model_version: str | None, only_unlabeled: bool = False,
                 ranges: Sequence[tuple[int, int]] | None = None,
                 done: set | None = None) -> tuple[list[dict], Counter]:
    """The tasks to predict, and how many were skipped for which reason.

    A listed task carries "labeled" (it has a non-cancelled annotation) and "versions" (the model versions of
    its predictions); `done` holds the keys (task ids) written before by this job to a file. model_version None
    (--refresh-references): tasks already predicted are predicted again.
    """
    selected: list[dict] = []
    skipped: Counter[str] = Counter()
    for task in tasks:
        if not in_ranges(task.get("id"), ranges):
            skipped["outside --task-ids"] += 1
        elif model_version is not None and (model_version in task.get("versions", ()) or (done and task_key(task) in done)):
            skipped["already predicted"] += 1
        elif only_unlabeled and task.get("labeled"):
            skipped["labeled (--only-unlabeled)"] += 1
        else:
            selected.append(task)
    return selected, skipped


def listed_task(task: dict) -> dict:
    """What the job keeps of a listed task: id, data, whether it is labeled, its predictions' versions."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    return {"id": int(task["id"]), "data": task.get("data") or {},
            "labeled": any(not a.get("was_cancelled") for a in annotations),
            "versions": sorted({str(p.get("model_version")) for p in task.get("predictions") or []
                                if isinstance(p, dict)})}


def list_project_tasks(client: LabelStudioClient, project_id: int, page_size: int = 100,
                       expected: int | None = None, passes: int = 3) -> list[dict]:
    """Every task of the project (listed_task records, by id).

    The list is ordered by updated_at, so a task that annotators change while we read moves to the first page;
    when fewer tasks than the project's count were seen, the pages are read again (at most `passes` times).
    """
    found: dict[int, dict] = {}
    for _ in range(passes):
        for tasks in client.task_pages(project_id, page_size):
            for task in tasks:
                found[int(task["id"])] = listed_task(task)
        if expected is None or len(found) >= expected:
            break
        logger.info("listed %d of %d tasks (tasks changed while listing); reading the pages again",
                    len(found), expected)
    return [found[i] for i in sorted(found)]
