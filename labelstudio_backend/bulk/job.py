"""One bulk job, local or on Ray: list the tasks, pin the references, predict, write, report.

Each task is predicted by the server's own code (DINOvBackend.preannotate: the project's reference store, the
per-project settings /setup saved in MODEL_DIR, the same filters and region conversion) with the pinned
references as its reference source. Tasks are listed once, before anything is written, and those that already
hold a prediction of the pinned version are skipped, so a rerun continues where the last run stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import replace
from typing import Any, Callable

from labelstudio_backend.bulk.folder import (
    FolderImages,
    fill_store_from_export,
    folder_tasks,
    label_config_from_export,
    load_export,
)
from labelstudio_backend.bulk.options import (
    OFFLINE_PROJECT_ID,
    BulkOptions,
    list_project_tasks,
    select_tasks,
)
from labelstudio_backend.bulk.pinned import PinnedReferences, PinnedSource, pin_references, version_at_revision
from labelstudio_backend.errors import BulkError
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.labelstudio.label_config import parse_label_config
from labelstudio_backend.labelstudio.payload import utc_now
from labelstudio_backend.references.sync import sync_project
from labelstudio_backend.runtime.runtime import Predictor, Runtime
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.serving.project_models import serve_project_models, served_project_model
from labelstudio_backend.serving.sinks import JsonSink, LabelStudioSink, Sink
from labelstudio_backend.serving.task_batches import BulkReport, Pipeline, Recorder, image_loader, progress_bar
from labelstudio_backend.settings import Settings
from labelstudio_backend.store import ReferenceStore
from labelstudio_backend.store.training import ActiveModel

logger = logging.getLogger(__name__)


def run_bulk(options: BulkOptions, settings: Settings | None = None,
             model_factory: Callable[[Settings], Predictor] | None = None,
             stop: threading.Event | None = None, client: LabelStudioClient | None = None,
             build_project: Callable[[Any, ActiveModel], Predictor] | None = None) -> BulkReport:
    """Run one bulk job (the command line's work); returns its report, also written to the report file.
    build_project: builds a project's fine-tuned model from the base (tests give a stand-in)."""
    settings = settings or Settings.from_env()
    settings = replace(settings, feature_cache_size=1)  # each encoded image is used once
    stop = stop or threading.Event()
    report = BulkReport(started_at=utc_now())
    if (options.project is None) == (options.images is None):
        raise BulkError("give --project <id> (a Label Studio project) or --images <folder> with --references "
                        "<export.json> (no Label Studio)")
    if options.images is not None and (options.references is None or options.out is None):
        raise BulkError("--images needs --references <Label Studio JSON export> and --out <file.json>")

    project: dict = {}
    if options.project is not None:
        client = client or LabelStudioClient.from_settings(settings)
        found = client.project(options.project)
        if found is None:
            raise BulkError(f"project {options.project} does not exist in Label Studio at {client.base_url}")
        project = found
        label_config = options.label_config or project.get("label_config")
        store = ReferenceStore(settings.db_path)
        images: Any = ImageLoader(settings, client=client)
        job = f"project-{options.project}"
        project_id = int(options.project)
        report.mode, report.project = "label_studio", project_id
    else:
        assert options.images is not None and options.references is not None  # checked above
        client = None  # folder mode: no Label Studio
        export = load_export(options.references)
        label_config = options.label_config or label_config_from_export(export)
        job = "images-" + hashlib.sha1(f"{options.images.resolve()}|{options.references.resolve()}".encode()
                                       ).hexdigest()[:10]
        store = ReferenceStore(settings.model_dir / "bulk" / f"{job}.references.sqlite3")
        project_id = OFFLINE_PROJECT_ID
        report.mode = "folder"
    if not label_config:
        raise BulkError("no labeling config: the project has none, or pass --label-config")
    config = parse_label_config(label_config)
    report.job = job

    if options.images is not None:
        assert options.references is not None  # checked above
        reference_dirs = tuple(options.reference_images) or (str(options.images), str(options.references.parent))
        tasks, files = folder_tasks(options.images, config.value_key, options.url_prefix, export, reference_dirs)
        images = FolderImages(settings, files, reference_dirs)
        fill_store_from_export(store, export, config.value_key, project_id)

    runtime = Runtime(settings, model_factory=model_factory, store=store, images=images)
    try:
        project_settings = runtime.projects.settings_for(project_id)
        if options.extra_params:
            project_settings = project_settings.with_overrides(options.extra_params)
        runtime.load_model()  # load the model first: its failure is the error to report
        if project_settings.project_model != "base":  # PROJECT_MODEL=base, also from --extra-params: the base
            serve_project_models(runtime, build_project)  # the project's fine-tuned model, when it has an active one
        backend = DINOvBackend(project_id, label_config, runtime=runtime, settings=project_settings)
        project_model = served_project_model(backend.model)
        report.model, report.checkpoint = ("project" if project_model else "base"), backend.model.checkpoint_id
        logger.info("predicting with the %s model %s", report.model, report.checkpoint)
        job_path = settings.model_dir / "bulk" / f"{job}.json"
        pinned = None if options.refresh_references else PinnedReferences.load(job_path)
        if pinned is not None and pinned.model_version != version_at_revision(backend, pinned.revision):
            logger.info("the checkpoint or the settings changed since the job was pinned (%s); pinning again",
                        pinned.model_version)
            pinned = None
        if pinned is None:
            if client is not None:
                sync_project(store, client.base_url, client.api_key, project_id, client=client)
            pinned = pin_references(backend, config.output_labels)
            if not pinned.examples:
                where = f"project {project_id}" if options.project is not None else str(options.references)
                raise BulkError(f"{where} has no usable labeled regions for the labels "
                                f"{', '.join(config.output_labels)}; annotate a few images first")
            pinned.save(job_path)
            logger.info("pinned %d examples of %s at reference revision %d: model_version %s", pinned.examples,
                        ", ".join(sorted(set(pinned.labels))), pinned.revision, pinned.model_version)
        else:
            logger.info("continuing with the references pinned at %s (revision %d, model_version %s); "
                        "--refresh-references takes the newest", pinned.pinned_at, pinned.revision,
                        pinned.model_version)
        report.model_version, report.revision = pinned.model_version, pinned.revision
        pinned_backend = DINOvBackend(project_id, label_config, runtime=runtime, settings=project_settings,
                                      references=PinnedSource(pinned, project_settings.max_examples_per_label))

        if client is not None:
            tasks = list_project_tasks(client, project_id, options.page_size, expected=project.get("task_number"))
            sink: Sink = (JsonSink(options.out, project_mode=True, replace=options.refresh_references) if options.out
                          else LabelStudioSink(client, project_id, replace=options.refresh_references))
        else:
            assert options.out is not None  # checked above
            sink = JsonSink(options.out, project_mode=False, image_key=config.value_key,
                            replace=options.refresh_references)
        report.out = str(options.out) if options.out else None
        report.tasks_listed = len(tasks)
        # --refresh-references: the tasks predicted from fewer references are predicted again (model_version names
        # the model and settings, not the references), their prediction of this version replaced
        selected, skipped = select_tasks(tasks, None if options.refresh_references else pinned.model_version,
                                         options.only_unlabeled, options.task_ids,
                                         sink.done_keys(pinned.model_version))
        report.selected, report.skipped = len(selected), dict(skipped)
        logger.info("%d of %d tasks to predict (%s)", len(selected), len(tasks),
                    ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none skipped")
        try:
            if options.ray is not None:
                from labelstudio_backend.bulk.ray_mode import run_on_ray  # Ray is an optional requirement

                run_on_ray(options, settings=backend.settings, label_config=label_config, project_id=project_id,
                           pinned=pinned, tasks=selected, images=images, sink=sink, report=report, stop=stop,
                           model_factory=model_factory, project_model=project_model, build_project=build_project)
            else:
                with progress_bar(len(selected), options.progress) as bar:
                    recorder = Recorder(sink, report, stop, progress=bar)
                    Pipeline(pinned_backend, config, pinned.model_version, recorder, image_loader(runtime, config),
                             options.batch_size, options.workers).run(selected)
        finally:
            sink.close()
    finally:
        runtime.shutdown()
    report.finished_at = utc_now()
    path = options.report or settings.model_dir / "bulk" / f"{job}.report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2))
    logger.info("report written to %s", path)
    return report
