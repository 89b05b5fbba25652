"""The command line of bulk jobs: `python -m labelstudio_backend.bulk --help`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from labelstudio_backend.bulk.job import run_bulk
from labelstudio_backend.bulk.options import BulkOptions, parse_task_ids
from labelstudio_backend.errors import BulkError, LabelStudioError, ModelUnavailable
from labelstudio_backend.runtime.runtime import Predictor
from labelstudio_backend.settings import Settings, SettingsError

logger = logging.getLogger(__name__)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m labelstudio_backend.bulk",
        description="Pre-annotate a whole Label Studio project (or a folder of images) with DINOv, from the "
                    "project's own annotations. LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, "
                    "DINOV_CHECKPOINT, DEVICE and the prediction settings come from the environment, as for "
                    "the server.")
    source = parser.add_argument_group("what to predict")
    source.add_argument("--project", type=int, help="Label Studio project id")
    source.add_argument("--images", type=Path, help="a folder of images to predict without Label Studio")
    source.add_argument("--references", type=Path,
                        help="with --images: a Label Studio JSON export whose annotations are the examples")
    source.add_argument("--reference-images", action="append", default=[],
                        help="folder holding the export's images (default: --images and the export's folder); "
                             "repeatable")
    source.add_argument("--url-prefix", default="",
                        help="with --images: prefix of the image paths written to the output tasks, e.g. "
                             "'/data/local-files/?d=photos/'")
    source.add_argument("--label-config", type=Path,
                        help="labeling config XML file (default: the project's; with --images: derived from "
                             "the export)")
    source.add_argument("--extra-params", help="per-project settings as JSON, e.g. '{\"score_threshold\": 0.5}' "
                                               "(default: what the server's /setup saved in MODEL_DIR)")
    select = parser.add_argument_group("which tasks")
    select.add_argument("--only-unlabeled", action="store_true", help="skip tasks that have an annotation")
    select.add_argument("--task-ids", help="task ids or ranges, e.g. 100-2000,2500 (inclusive)")
    select.add_argument("--refresh-references", action="store_true",
                        help="pin the newest references instead of those the job started with")
    run = parser.add_argument_group("how")
    run.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    run.add_argument("--workers", type=int, default=4, help="threads fetching images ahead (default 4)")
    run.add_argument("--page-size", type=int, default=100, help="tasks per Label Studio API page (default 100)")
    run.add_argument("--out", type=Path, help="write predictions to this JSON file instead of posting them")
    run.add_argument("--report", type=Path,
                     help="report file (default: MODEL_DIR/bulk/<job>.report.json)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on Ray: no address starts a local instance (or joins RAY_ADDRESS); 'auto' joins "
                          "the cluster this machine belongs to; ray://host:10001 connects a Ray client")
    ray.add_argument("--replicas", type=int,
                     help="model replicas (default: one per GPU of the cluster; 1 without GPUs)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per model replica")
    return parser


def options_from_args(args: argparse.Namespace) -> BulkOptions:
    """The parsed command line as BulkOptions (BulkError for unreadable --extra-params / --label-config)."""
    extra = None
    if args.extra_params:
        try:
            extra = json.loads(args.extra_params)
        except ValueError as e:
            raise BulkError(f"--extra-params is not JSON ({e}); e.g. '{{\"score_threshold\": 0.5}}'") from None
    config = None
    if args.label_config:
        try:
            config = args.label_config.read_text()
        except OSError as e:
            raise BulkError(f"--label-config {args.label_config}: {e}") from None
    return BulkOptions(
        project=args.project, images=args.images, references=args.references,
        reference_images=tuple(args.reference_images), url_prefix=args.url_prefix, label_config=config,
        extra_params=extra, only_unlabeled=args.only_unlabeled,
        task_ids=parse_task_ids(args.task_ids) if args.task_ids else None,
        refresh_references=args.refresh_references, batch_size=args.batch_size, workers=args.workers,
        page_size=args.page_size, out=args.out, report=args.report, progress=not args.no_progress, ray=args.ray,
        replicas=args.replicas, cpus_per_replica=args.cpus_per_replica)


class StopOnSigint:
    """First Ctrl-C: finish the current batch, write, report. Second: stop at once."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous: Any = None  # the SIGINT handler this one replaced

    def __enter__(self) -> StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        logger.warning("Ctrl-C: stopping after the current batch (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def main(argv: list[str] | None = None, model_factory: Callable[[Settings], Predictor] | None = None) -> int:
    """Exit status: 0 all selected tasks done, 1 some failed, 2 bad input, 130 stopped by Ctrl-C."""
    args = argument_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: invalid setting: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    try:
        options = options_from_args(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with StopOnSigint(stop), logging_redirect_tqdm():
            report = run_bulk(options, settings, model_factory=model_factory, stop=stop)
    except (BulkError, SettingsError, LabelStudioError, ModelUnavailable, ValueError) as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("stopped at once; predictions written so far are kept, run the command again to continue")
        return 130
    print(report.summary())
    if report.interrupted:
        return 130
    return 1 if report.failed or report.stopped_because else 0
