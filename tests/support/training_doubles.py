"""Stand-ins for the training child process (labelstudio_backend.training.job.run_job): importable by name, since
the child is spawned."""

from __future__ import annotations

import os
import time

from labelstudio_backend.store.training import TrainingStore, training_db


def sleeping_job(spec) -> None:
    """Reports that it runs, then trains "forever" (until it is terminated)."""
    store = TrainingStore(training_db(spec.settings.model_dir))
    store.update_job(spec.job_id, state="running", step=1, steps=100, message=f"sleeping in {os.getpid()}")
    time.sleep(300)


def rejected_job(spec) -> None:
    store = TrainingStore(training_db(spec.settings.model_dir))
    store.update_job(spec.job_id, state="rejected", message="not better, the served model stays: a test")


def crashing_job(spec) -> None:
    os._exit(3)  # as an out-of-memory kill would end it
