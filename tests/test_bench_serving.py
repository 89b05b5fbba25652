"""benchmarks/bench_serving.py end to end: gunicorn, the demo model, Label Studio's requests, hostile requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_serving_benchmark_reports_every_flow_and_the_hostile_classes(tmp_path):
    out = tmp_path / "serving.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--checkpoint", "demo", "--annotators", "1,2", "--images", "1",
         "--hostile", "25", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [level["annotators"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        n = level["annotators"]
        # each annotator: open, first click, two next clicks, a click on a new image, one retrieve
        assert level["task_open"]["n"] == n and level["first_click_after_open"]["n"] == n
        assert level["next_click"]["n"] == 2 * n and level["first_click_new_image"]["n"] == n
        for kind in ("task_open", "first_click_after_open", "next_click", "first_click_new_image"):
            assert 0 < level[kind]["p50_ms"] <= level[kind]["p95_ms"]
        assert level["retrieve_predictions"]["images"] == n and level["retrieve_predictions"]["images_per_s"] > 0
        assert level["statuses"] == {"2xx": 6 * n}, level["failures"]
        assert level["regions_per_task_open"] > 0  # the references were used: pre-annotation found objects
        hostile = level["hostile"]
        assert sum(hostile["by_class"].values()) == 25
        assert hostile["by_class"].get("4xx", 0) >= 10 and not hostile["by_class"].get("5xx")
        assert hostile["by_kind"]["bad JSON: 4xx"] == 1 and hostile["by_kind"]["path out of root: 2xx"] == 1
    assert report["rss_mb"]["after_warmup"] > 100 and report["rss_mb"]["end"] > 100
    assert report["backend_alive"] is True


def test_labeling_in_order_reports_task_opens_with_and_without_encoding_ahead(tmp_path):
    out = tmp_path / "in_order.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--checkpoint", "demo", "--in-order", "--tasks", "3",
         "--seconds-per-task", "1.5", "--threads", "4", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [mode["encode_ahead_tasks"] for mode in report["modes"]] == [0, 2]
    for mode in report["modes"]:
        assert mode["first_open_ms"] > 0 and mode["task_open"]["n"] == 2 and mode["click"]["n"] == 3
        assert mode["statuses"] == {"2xx": 6} and mode["regions_per_task_open"] > 0
    without, with_ahead = report["modes"]
    assert without["data_manager_requests"] == 0 and without["encode_ahead_runs"] == 0
    assert with_ahead["encode_ahead_runs"] >= 3 and with_ahead["data_manager_requests"] >= 3  # one per open
