"""The bulk pipeline on Ray Data: `python -m labelstudio_backend.bulk ... --ray [ADDRESS]` (this module imports ray).

The driver (the command) lists the tasks, pins the references and writes the results, exactly as in local
mode. Between, a Ray Dataset of the selected tasks flows through two stages:

    tasks --map_batches(ImageFetcher, CPU actors)--> raw image bytes
          --map_batches(Segmenter, one actor per model replica, 1 GPU each when the cluster has GPUs)-->
          predictions --iter_batches (driver)--> Label Studio API or --out file, in batches

Each Segmenter holds one model and the pinned references (sent with the actor, not read from MODEL_DIR),
and predicts with the same code as local mode (pipeline.segment_batch on a DINOvBackend over a PinnedSource), so
both modes give the same predictions. Images travel as their encoded bytes (smaller than pixels) and are decoded next to the
model. A project served by its fine-tuned checkpoint (the driver decides, by the server's rules, PROJECT_MODEL
included) is served by it on the workers too: the driver sends the checkpoint's delta file and record with the
actor, which writes the file to a folder of its own and builds the model from its base as the server does; an
actor whose model is not the one the references were pinned with refuses to start.

A cluster: on the head node `ray start --head --port=6379`, on every other node
`ray start --address=<head>:6379` (GPUs are found by Ray); every node needs this repository and its Python
environment at the same path (workers import labelstudio_backend and dinov from there) and reaches Label
Studio. Then, on the head node: `python -m labelstudio_backend.bulk --project 3 --ray auto`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from labelstudio_backend.bulk.folder import FolderImages
from labelstudio_backend.bulk.options import BulkOptions
from labelstudio_backend.bulk.pinned import PinnedReferences, PinnedSource
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.labelstudio.label_config import parse_label_config
from labelstudio_backend.labelstudio.payload import task_id_of
from labelstudio_backend.references.sources import embedding_checkpoint
from labelstudio_backend.runtime.runtime import Predictor, Runtime
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.serving.project_models import serve_sent_project_model
from labelstudio_backend.serving.sinks import Sink
from labelstudio_backend.serving.task_batches import (
    BulkReport,
    Recorder,
    failure_reason,
    finish_report,
    progress_bar,
    segment_batch,
)
from labelstudio_backend.settings import Settings
from labelstudio_backend.store.training import ActiveModel

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class ImageFetcher:
    """Ray Data stage on CPU workers: task JSON -> the task's image bytes (or why it could not be fetched)."""

    def __init__(self, settings: Settings, label_config: str, folder: FolderImages | None, threads: int):
        self.config = parse_label_config(label_config)
        self.images = folder if folder is not None else ImageLoader(settings)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ray-images")

    def _fetch(self, task_json: str) -> tuple[bytes, str]:
        task = json.loads(task_json)
        try:
            return self.images.fetch(self.config.image_url(task), task_id_of(task.get("id"))), ""
        except Exception as e:
            return b"", failure_reason(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fetched = list(self.pool.map(self._fetch, batch["task"]))
        return {"task": batch["task"], "image": np.array([data for data, _ in fetched], dtype=object),
                "error": np.array([error for _, error in fetched], dtype=object)}


class Segmenter:
    """Ray Data stage, one actor per model replica: image bytes -> prediction JSON (or why there is none)."""

    def __init__(self, settings: Settings, label_config: str, project_id: int, pinned: PinnedReferences,
                 model_factory: Callable[[Settings], Predictor] | None = None,
                 project_model: ActiveModel | None = None, delta: bytes = b"",
                 build_project: Callable[[Any, ActiveModel], Predictor] | None = None):
        runtime = Runtime(settings, model_factory=model_factory)
        runtime.load_model()  # load the model when the actor starts, not with its first batch
        if project_model is not None:  # the project's fine-tuned checkpoint, sent by the driver
            self.folder = tempfile.TemporaryDirectory(prefix="dinov-project-model-")  # removed with the actor
            serve_sent_project_model(runtime, project_model, delta, Path(self.folder.name), build_project)
        self.backend = DINOvBackend(project_id, label_config, runtime=runtime, settings=settings,
                                    references=PinnedSource(pinned, settings.max_examples_per_label))
        self.backend.model.load_model()  # the project's model too
        served = embedding_checkpoint(self.backend.model)  # the checkpoint and its embeddings' form
        if served != pinned.checkpoint:
            models = runtime.project_models
            why = models.stale.get(project_id) if models is not None and project_model is not None else None
            raise RuntimeError(f"this Ray worker's model is {served}, the references were pinned with "
                               f"{pinned.checkpoint}: {why or 'every node needs the driver DINOV_CHECKPOINT'}")
        self.config = parse_label_config(label_config)
        self.version = pinned.model_version
        self.decoder = ImageLoader(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks = [json.loads(t) for t in batch["task"]]
        outcome: list[tuple[str, str]] = [("", "")] * len(tasks)
        items, where = [], []
        for i, (task, data, error) in enumerate(zip(tasks, batch["image"], batch["error"])):
            if error:
                outcome[i] = ("", str(error))
                continue
            try:
                items.append((task, self.decoder.decode(bytes(data), self.config.image_url(task))))
                where.append(i)
            except Exception as e:
                outcome[i] = ("", failure_reason(e))
        for i, result in zip(where, segment_batch(self.backend, self.config, self.version, items)):
            outcome[i] = (json.dumps(result.prediction), "") if result.prediction is not None else ("", result.reason)
        return {"task": batch["task"], "prediction": np.array([p for p, _ in outcome], dtype=object),
                "error": np.array([e for _, e in outcome], dtype=object)}


def init_ray(address: str | None, **kwargs: Any) -> bool:
    """Connect to (or start) Ray; True when this call started it. Workers import this repository's packages
    from REPO_ROOT (the same path on every node of a cluster). kwargs go to ray.init (e.g. num_cpus)."""
    import ray

    if ray.is_initialized():
        return False
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address=address or None, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}},
             **kwargs)
    resources = ray.cluster_resources()
    logger.info("Ray: %d nodes, %s CPUs, %s GPUs", len(ray.nodes()), resources.get("CPU", 0),
                resources.get("GPU", 0))
    return True


def run_on_ray(options: BulkOptions, settings: Settings, label_config: str, project_id: int,
               pinned: PinnedReferences, tasks: list[dict], images: Any, sink: Sink, report: BulkReport,
               stop: threading.Event, model_factory: Callable[[Settings], Predictor] | None = None,
               project_model: ActiveModel | None = None,
               build_project: Callable[[Any, ActiveModel], Predictor] | None = None) -> BulkReport:
    """Predict `tasks` on Ray and write the results through `sink` (see the module docstring). project_model: the
    project's fine-tuned checkpoint the driver serves it with (None: the base model); its file is sent to the
    workers. build_project: builds it from the base (tests give a stand-in)."""
    import ray
    from ray.data import ActorPoolStrategy

    started_here = init_ray(options.ray)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if settings.device != "cpu" else 0
        replicas = options.replicas or max(1, gpus)
        fetchers = max(1, min(4, int(resources.get("CPU", 1)) // 2))
        logger.info("Ray: %d model replicas (%s), %d image fetchers; %s", replicas,
                    "1 GPU each" if gpus else f"{options.cpus_per_replica:g} CPU each", fetchers,
                    f"the project's model {project_model.checkpoint_id}" if project_model else "the base model")
        delta = Path(project_model.path).read_bytes() if project_model is not None else b""
        folder = images if isinstance(images, FolderImages) else None
        dataset: ray.data.Dataset = ray.data.from_items([{"task": json.dumps(task)} for task in tasks])
        dataset = dataset.map_batches(
            ImageFetcher, batch_size=options.batch_size, batch_format="numpy", num_cpus=0.5,
            fn_constructor_kwargs={"settings": settings, "label_config": label_config, "folder": folder,
                                   "threads": options.workers},
            compute=ActorPoolStrategy(size=fetchers))
        dataset = dataset.map_batches(
            Segmenter, batch_size=options.batch_size, batch_format="numpy",
            num_gpus=1 if gpus else 0, num_cpus=options.cpus_per_replica,
            fn_constructor_kwargs={"settings": settings, "label_config": label_config, "project_id": project_id,
                                   "pinned": pinned, "model_factory": model_factory, "project_model": project_model,
                                   "delta": delta, "build_project": build_project},
            compute=ActorPoolStrategy(size=replicas))

        started = time.perf_counter()
        predicted = 0
        with progress_bar(len(tasks), options.progress) as bar:
            recorder = Recorder(sink, report, stop, progress=bar)
            try:
                for batch in dataset.iter_batches(batch_size=options.batch_size, batch_format="numpy"):
                    writes = []
                    for task_json, prediction, error in zip(batch["task"], batch["prediction"], batch["error"]):
                        task = json.loads(task_json)
                        if prediction:
                            writes.append((task, json.loads(prediction)))
                        else:
                            recorder.failed(task, str(error))
                    recorder.write(writes)
                    predicted += len(batch["task"])
                    if stop.is_set():
                        break
            finally:
                recorder.finish()
        finish_report(report, predicted, time.perf_counter() - started, unfinished=predicted < len(tasks))
        return report
    finally:
        if started_here:
            ray.shutdown()
