"""Run one region bomb through the app in a fresh process and report the process's peak memory growth.

    python -m tests.support.bomb_probe <predict-bitmask|predict-brush|webhook-bitmask|webhook-brush> <model_dir>

Prints one JSON line: {"status": HTTP status of the bomb request, "growth_mb": peak RSS growth over a warmed-up
baseline, "after": status of a normal /predict afterwards, "warnings": log lines at WARNING about the bomb}.
A fresh process, so that the peak (ru_maxrss) is this request's and nobody else's.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import numpy as np

from tests.backend.http.test_app import Backend, brush, scene_image, task
from tests.support.bombs import bitmask_region, brush_region, png_bomb, rle_bomb


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def main(kind: str, model_dir: str) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    backend = Backend(Path(model_dir))
    backend.setup()
    backend.runtime.load_model()
    stroke = np.zeros(scene_image("a").shape[:2], bool)
    stroke[15:18, 14:26] = True
    warm = backend.predict([task(1, "a")], context={"result": [brush(stroke, "Red")]})  # warm every code path
    assert warm.status_code == 200, warm.json
    if kind.endswith("bitmask"):
        region = bitmask_region(png_bomb(13000, 13000), "Red")
    else:
        region = brush_region(rle_bomb(20000, 10000), 20000, 10000, "Red")
    baseline = peak_mb()
    if kind.startswith("predict"):
        status = backend.predict([task(1, "a")], context={"result": [region]}).status_code
    else:
        annotation = {"id": 900, "task": 2, "project": 7, "result": [region], "was_cancelled": False,
                      "created_at": "2024-05-01T10:00:00Z", "updated_at": "2024-05-01T10:00:00Z"}
        status = backend.post("/webhook", {"action": "ANNOTATION_CREATED", "annotation": annotation,
                                           "task": task(2, "b"), "project": {"id": 7}}).status_code
        backend.drain()
    after = backend.predict([task(3, "c")]).status_code  # the embeddings of the references, the bomb's included
    backend.drain()
    growth = peak_mb() - baseline
    backend.runtime.shutdown()
    print(json.dumps({"status": status, "growth_mb": round(growth, 1), "after": after,
                      "warnings": [r for r in records if "canvas" in r or "refused" in r]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
