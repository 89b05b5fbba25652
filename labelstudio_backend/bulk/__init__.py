"""Bulk auto-labeling: pre-annotate a whole Label Studio project, or a folder of images, with DINOv.

    python -m labelstudio_backend.bulk --project 3                        # post predictions to Label Studio
    python -m labelstudio_backend.bulk --project 3 --only-unlabeled --task-ids 1000-1999
    python -m labelstudio_backend.bulk --project 3 --out predictions.json  # for /api/projects/3/import/predictions
    python -m labelstudio_backend.bulk --images photos/ --references export.json --out tasks.json
    python -m labelstudio_backend.bulk --project 3 --ray auto             # on a Ray cluster (ray_mode.py)

The modules, in the order a job meets them:

    cli       the command line -> BulkOptions, Ctrl-C handling, exit status
    job       run_bulk: one job from start to report
    options   BulkOptions, task id ranges, listing the project's tasks, which tasks to predict
    folder    folder mode (a folder of images and a Label Studio export, no Label Studio)
    pinned    the references pinned at the job's start, as the backend's reference source
    ray_mode  the same batches on Ray Data

Below them, in serving/ (shared with the deferred predictions of /predict): task_batches (images fetched ahead,
encoded in batches, segmented by the backend, written while the next batch runs; the report) and sinks (where
predictions go: Label Studio's import API or a JSON file).

Label Studio 1.23.2 facts this relies on (checked against a running server):
- GET /api/projects/<id>/tasks/?page=&page_size= lists tasks with their annotations and predictions, newest
  updated_at first, 404 past the last page. POST /api/predictions/ (one prediction) sets its task's
  updated_at, which moves the task to the first page; POST /api/projects/<id>/import/predictions bulk-creates
  without touching updated_at (serving/sinks.py).
- A prediction with an empty result is stored (it marks the task as predicted). Among the entries of a
  /predict answer, [] stores nothing for its task (so do {} and an entry without "result", which Label Studio
  logs as errors); a null entry fails the whole request.
- The data manager's task list (/api/tasks/) makes Label Studio call the ML backend for tasks without
  predictions when the project retrieves predictions automatically, so it is not used.
"""

from __future__ import annotations

from labelstudio_backend.bulk.cli import StopOnSigint, main
from labelstudio_backend.bulk.folder import FolderImages, label_config_from_export
from labelstudio_backend.bulk.job import run_bulk
from labelstudio_backend.bulk.options import BulkOptions, parse_task_ids, select_tasks
from labelstudio_backend.bulk.pinned import PinnedReferences
from labelstudio_backend.errors import BulkError
from labelstudio_backend.serving.sinks import JsonSink, LabelStudioSink
from labelstudio_backend.serving.task_batches import MAX_WRITE_FAILURES, BulkReport

__all__ = ["BulkError", "BulkOptions", "BulkReport", "FolderImages", "JsonSink", "LabelStudioSink",
           "MAX_WRITE_FAILURES", "PinnedReferences", "StopOnSigint", "label_config_from_export", "main",
           "parse_task_ids", "run_bulk", "select_tasks"]
