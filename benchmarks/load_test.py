"""Bounded load test of the backend under gunicorn: interactive, pre-annotation and hostile requests mixed.

    python benchmarks/load_test.py                           # 1,000 requests, 8 at a time, the colour model double
    python benchmarks/load_test.py --app _wsgi:app           # the real demo model (DINOV_CHECKPOINT=demo, CPU)
    python benchmarks/load_test.py --requests 200 --json out.json

Everything runs on 127.0.0.1: a fake Label Studio (tests/support/doubles.py: the API, the task images) and this backend
(`gunicorn <app>`, 1 worker, --threads threads). No request leaves the machine: the hostile image URLs point at
closed loopback ports or schemes the backend must refuse.

The mix (fixed seed): 50 % interactive (a click or a box on one of 24 task images, more images than the feature
cache holds), 30 % pre-annotation (1-4 tasks, no context), 20 % hostile (malformed, oversized, deeply nested,
wrong types, unknown projects, bad URLs, bad regions, a "Retrieve predictions" past the time budget, bad
webhooks and /references actions). The first 10 % of the requests are the warm-up: memory (RSS of the gunicorn
workers) is read after it and at the end.

Pass: no 5xx answer and no dropped connection, and memory at the end less than 30 % above memory after warm-up.
Exit status 0 on pass, 1 on fail.

benchmarks/bench_serving.py measures what annotators feel (the latency of each step of their flow, real model,
no Label Studio API); this script is the bounded reliability check: a fixed request count, the Label Studio API
in play (sync, background posting), a pass criterion.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.doubles import CONFIG, SIZE, TOKEN, FakeLabelStudio, brush, png, scene  # noqa: E402
from tests.fault_harness import Backend, wait_for  # noqa: E402

PROJECT = 3
IMAGES = 24  # task images: more than FEATURE_CACHE_SIZE (8), so clicks also miss the feature cache
BULK_FROM = 100  # the tasks of the "Retrieve predictions" past the budget: others than the interactive ones
MAX_GROWTH = 0.30


@dataclass
class Request:
    kind: str  # interactive | preannotation | hostile
    case: str  # what it is, for the report
    method: str
    path: str
    body: bytes | None = None
    content_type: str = "application/json"


def build_project(ls: FakeLabelStudio) -> list[int]:
    """Project 3: two annotated tasks (references), IMAGES tasks to click on and pre-annotate (their ids are
    returned), and IMAGES more for the hostile "Retrieve predictions" past the budget, whose tasks go to the
    background (and would answer [] to pre-annotation while it owns them)."""
    ls.add_project(PROJECT)
    image, masks = scene(1)
    ls.add_task(PROJECT, 1, png(image), [[brush(masks["Red"], "Red", "r1")]])
    image, masks = scene(2)
    ls.add_task(PROJECT, 2, png(image), [[brush(masks["Blue"], "Blue", "b1")]])
    ids = []
    for tid in range(10, 10 + IMAGES):
        image, _ = scene(tid)
        ls.add_task(PROJECT, tid, png(image))
        ids.append(tid)
    for tid in range(BULK_FROM, BULK_FROM + IMAGES):
        image, _ = scene(tid)
        ls.add_task(PROJECT, tid, png(image))
    return ids


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _task(ls: FakeLabelStudio, tid: int) -> dict:
    return {"id": tid, "project": PROJECT, "data": dict(ls.tasks[tid]["data"])}


def _predict(tasks: list[dict], context: dict | None = None, project: Any = f"{PROJECT}.1700000000",
             config: str = CONFIG) -> bytes:
    return _json({"tasks": tasks, "project": project, "label_config": config, "params": {"context": context}})


def click(x: float, y: float, label: str = "Red") -> dict:
    h, w = SIZE
    return {"result": [{"type": "keypointlabels", "from_name": "tag", "to_name": "image", "original_width": w,
                        "original_height": h, "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 1,
                                                        "keypointlabels": [label]}, "is_positive": True}]}


def box(x0: float, y0: float, x1: float, y1: float, label: str = "Blue") -> dict:
    h, w = SIZE
    return {"result": [{"type": "rectanglelabels", "from_name": "tag", "to_name": "image", "original_width": w,
                        "original_height": h, "value": {"x": 100 * x0 / w, "y": 100 * y0 / h,
                                                        "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h,
                                                        "rectanglelabels": [label]}}]}


def hostile_cases(ls: FakeLabelStudio, task_ids: list[int]) -> list[tuple[str, str, str, bytes | None]]:
    """(case, method, path, body) of requests a careless or hostile client sends."""
    task = _task(ls, task_ids[0])
    with_url = lambda url: [{"id": 999_999, "data": {"image": url}}]  # noqa: E731
    nested = b"[" * 100_000 + b"]" * 100_000
    return [
        ("not json", "POST", "/predict", b"{tasks: oops"),
        ("json list body", "POST", "/predict", _json([1, 2, 3])),
        ("no tasks", "POST", "/predict", _json({"tasks": [], "project": "3.1"})),
        ("tasks not a list", "POST", "/predict", _json({"tasks": "all", "project": "3.1", "label_config": CONFIG})),
        ("unknown project", "POST", "/predict", _predict([task], project="abc")),
        ("bad label config", "POST", "/predict", _predict([task], config="<View><Image name=")),
        ("closed loopback port image", "POST", "/predict", _predict(with_url("http://127.0.0.1:1/x.png"))),
        ("file:// image", "POST", "/predict", _predict(with_url("file:///etc/passwd"))),
        ("local-files traversal", "POST", "/predict", _predict(with_url("/data/local-files/?d=../../etc/passwd"))),
        ("missing upload", "POST", "/predict", _predict(with_url("/data/upload/3/nothing-here.png"))),
        ("context not an object", "POST", "/predict", _predict([task], context="click here")),  # type: ignore[arg-type]
        ("region without label", "POST", "/predict",
         _predict([task], {"result": [{"type": "keypointlabels", "value": {"x": 5, "y": 5}}]})),
        ("click far outside", "POST", "/predict", _predict([task], click(1e9, -1e9))),
        ("two tasks interactive", "POST", "/predict", _predict([task, task], click(5, 5))),
        ("retrieve past the budget", "POST", "/predict",
         _predict([_task(ls, t) for t in range(BULK_FROM, BULK_FROM + IMAGES)])),
        ("oversized body", "POST", "/predict", _predict([{**task, "pad": "x" * (3 * 1024 * 1024)}])),
        ("deeply nested json", "POST", "/predict", nested),
        ("webhook without action", "POST", "/webhook", _json({"project": {"id": PROJECT}})),
        ("webhook bad annotation", "POST", "/webhook",
         _json({"action": "ANNOTATION_CREATED", "project": {"id": PROJECT}, "annotation": "gone", "task": None})),
        ("webhook unknown event", "POST", "/webhook", _json({"action": "LABEL_LINK_DELETED", "project": {"id": 3}})),
        ("references bad project", "GET", "/references?project=../../etc", None),
        ("references bad action", "POST", f"/references?project={PROJECT}&action=explode", None),
        ("references sync again", "POST", f"/references?project={PROJECT}&action=sync", None),
        ("setup without project", "POST", "/setup", _json({"schema": CONFIG})),
        ("unknown path", "GET", "/../../etc/passwd", None),
    ]


def build_requests(ls: FakeLabelStudio, task_ids: list[int], count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    hostile = hostile_cases(ls, task_ids)
    h, w = SIZE
    out: list[Request] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:
            tid = rng.choice(task_ids)
            _, masks = scene(tid)
            if rng.random() < 0.7:
                ys, xs = masks["Red"].nonzero()
                j = rng.randrange(len(xs))
                context, case = click(xs[j] + 0.5, ys[j] + 0.5), "click"
            else:
                ys, xs = masks["Blue"].nonzero()
                context, case = box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), "box"
            out.append(Request("interactive", case, "POST", "/predict", _predict([_task(ls, tid)], context)))
        elif roll < 0.8:
            tasks = [_task(ls, t) for t in rng.sample(task_ids, rng.randint(1, 4))]
            out.append(Request("preannotation", f"{len(tasks)} tasks", "POST", "/predict", _predict(tasks)))
        else:
            case, method, path, body = hostile[rng.randrange(len(hostile))]
            out.append(Request("hostile", case, method, path, body))
    return out


def worker_rss_kb(master_pid: int) -> int:
    """Resident memory of gunicorn's workers (the master's children), in KiB."""
    total = 0
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def run(args: argparse.Namespace) -> dict:
    ls = FakeLabelStudio()
    task_ids = build_project(ls)
    tmp = Path(tempfile.mkdtemp(prefix="dinov-load-"))
    env = {"PREDICT_TIME_BUDGET": str(args.budget), "DINOV_CHECKPOINT": args.checkpoint, "DEVICE": "cpu",
           "LOG_LEVEL": "WARNING", "FAULT_ENCODE_DELAY": str(args.encode_delay)}
    backend = Backend(tmp / "model_dir", ls.url, TOKEN, app=args.app, threads=args.threads, **env)
    backend.start(timeout=300)
    try:
        setup = backend.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG})
        setup.raise_for_status()
        wait_for(lambda: backend.get(f"/references?project={PROJECT}").json()["stats"].get("examples", 0) >= 2,
                 60, "the reference sync")
        plan = build_requests(ls, task_ids, args.requests, args.seed)
        warmup = max(1, args.requests // 10)
        results: list[tuple[Request, int | str, float]] = []
        deferred = Counter()  # pre-annotation entries: predictions, and [] (deferred or owned by the background)
        lock = threading.Lock()
        local = threading.local()

        def send(request: Request) -> None:
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            started = time.perf_counter()
            try:
                answer = session.request(request.method, backend.url + request.path, data=request.body,
                                         headers={"Content-Type": request.content_type}, timeout=300)
                status: int | str = answer.status_code
                if request.kind == "preannotation" and status == 200:
                    entries = answer.json()["results"]
                    with lock:
                        deferred["predicted"] += sum(isinstance(e, dict) for e in entries)
                        deferred["[]"] += sum(e == [] for e in entries)
            except requests.RequestException as error:
                status = type(error).__name__
            with lock:
                results.append((request, status, time.perf_counter() - started))

        master = backend.process.process.pid
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(send, plan[:warmup]))
        rss_warm = worker_rss_kb(master)
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(send, plan[warmup:]))
        seconds = time.perf_counter() - started
        rss_end = worker_rss_kb(master)
        health = backend.get("/health").json()
    finally:
        backend.stop()
        ls.stop()
    return summarise(results, rss_warm, rss_end, seconds, args, health, deferred)


def summarise(results: list, rss_warm: int, rss_end: int, seconds: float, args: argparse.Namespace,
              health: dict, deferred: Counter) -> dict:
    by_kind: dict[str, list] = defaultdict(list)
    for request, status, latency in results:
        by_kind[request.kind].append((request, status, latency))
    kinds = {}
    for kind, rows in sorted(by_kind.items()):
        latencies = sorted(latency for _, _, latency in rows)
        classes = Counter(f"{status // 100}xx" if isinstance(status, int) else status for _, status, _ in rows)
        kinds[kind] = {"requests": len(rows), "p50_ms": round(1000 * statistics.median(latencies), 1),
                       "p95_ms": round(1000 * latencies[max(0, int(0.95 * len(latencies)) - 1)], 1),
                       "statuses": dict(sorted(classes.items()))}
    hostile = defaultdict(Counter)
    for request, status, _ in by_kind.get("hostile", []):
        hostile[request.case][str(status)] += 1
    bad = [(r.kind, r.case, s) for r, s, _ in results if not isinstance(s, int) or s >= 500]
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else 0.0
    return {"app": args.app, "requests": len(results), "concurrency": args.concurrency, "threads": args.threads,
            "seconds": round(seconds, 1), "kinds": kinds, "hostile_cases": {k: dict(v) for k, v in sorted(hostile.items())},
            "server_errors": bad[:20], "server_error_count": len(bad),
            "rss_after_warmup_mb": round(rss_warm / 1024, 1), "rss_end_mb": round(rss_end / 1024, 1),
            "memory_growth": round(growth, 3), "health_at_end": health.get("status"),
            "preannotation_entries": dict(deferred),
            "passed": not bad and growth < MAX_GROWTH}


def print_report(summary: dict) -> None:
    print(f"{summary['requests']} requests, {summary['concurrency']} concurrent, {summary['app']}, "
          f"{summary['seconds']} s")
    print(f"{'kind':<14} {'requests':>8} {'p50 ms':>9} {'p95 ms':>9}  statuses")
    for kind, row in summary["kinds"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        print(f"{kind:<14} {row['requests']:>8} {row['p50_ms']:>9} {row['p95_ms']:>9}  {statuses}")
    entries = summary["preannotation_entries"]
    print(f"pre-annotation entries: {entries.get('predicted', 0)} predictions, {entries.get('[]', 0)} [] "
          "(over the budget: finished in the background)")
    print("hostile cases:")
    for case, statuses in summary["hostile_cases"].items():
        print(f"  {case:<28} {statuses}")
    print(f"memory (gunicorn worker RSS): {summary['rss_after_warmup_mb']} MiB after warm-up, "
          f"{summary['rss_end_mb']} MiB at the end ({100 * summary['memory_growth']:+.1f} %)")
    for kind, case, status in summary["server_errors"]:
        print(f"  5xx/dropped: {kind} {case}: {status}")
    print("PASS" if summary["passed"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads of the one worker")
    parser.add_argument("--app", default="tests.fault_app:app",
                        help="gunicorn app: tests.fault_app:app (colour model double) or _wsgi:app (DINOv)")
    parser.add_argument("--checkpoint", default="demo", help="DINOV_CHECKPOINT with --app _wsgi:app")
    parser.add_argument("--encode-delay", type=float, default=0.02,
                        help="seconds per encoded image of the model double (default 0.02)")
    parser.add_argument("--budget", type=float, default=2.0, help="PREDICT_TIME_BUDGET, seconds (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = run(args)
    print_report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
