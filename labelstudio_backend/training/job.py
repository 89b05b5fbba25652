"""One training job, run in a child process of its own (labelstudio_backend.training.scheduler starts it).

    run_job(JobSpec(job_id=7, project_id=3, settings=settings, label_config=xml))

Low priority (nice) and one torch thread, so the worker that serves predictions stays responsive; its memory
and its GIL are its own, and cancelling it is ending the process. Every step of the way is written to the
training store; the new checkpoint becomes the project's active one only when it measures better.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from labelstudio_backend.settings import Settings
from labelstudio_backend.store.training import ActiveModel, TrainingStore, training_db
from labelstudio_backend.training.outcome import Rejection

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # how often the step count is written to the store
NICENESS = 10


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    project_id: int
    settings: Settings
    label_config: str


def checkpoint_dir(settings: Settings) -> Path:
    return settings.model_dir / "project_models"


def served_collector(settings: Settings, num_labels: int) -> Callable:
    """collect(predictor, examples, targets): dinov.train.finetune.collect_regions with what pre-annotation does to
    the regions (the project's instance count, overlap and minimum-area rules), so that the figures are those of
    the predictions annotators would get."""
    from dinov.results import Instance
    from dinov.train.finetune import collect_regions
    from labelstudio_backend.serving.instances import LabeledMask, SelectionRules, select_instances

    rules = SelectionRules.from_settings(settings)

    def select(found: list) -> list:
        kept = select_instances([LabeledMask(str(r.class_index), r.mask, r.score) for r in found], rules)
        return [Instance(mask=k.mask, score=k.score, class_index=int(k.label), box=(0, 0, 0, 0)) for k in kept]

    def collect(predictor: Any, examples: list, targets: list) -> list:
        return collect_regions(predictor, examples, targets, settings.max_examples_per_label,
                               max_instances=settings.max_instances_per_label * num_labels, select=select)
    return collect


def served_threshold(settings: Settings, model: Any) -> tuple[float | None, float]:
    """(SCORE_THRESHOLD when the project sets one, else None; the threshold the served model applies): a set
    SCORE_THRESHOLD is applied as it is, a model's own default is lowered per image until a region is found."""
    if settings.score_threshold is not None:
        return settings.score_threshold, settings.score_threshold
    return None, float(model.default_score_threshold)


def run_job(spec: JobSpec) -> None:
    """The child process's entry point: every error ends as the job's "failed" state with its message."""
    logging.basicConfig(level=getattr(logging, spec.settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    store = TrainingStore(training_db(spec.settings.model_dir))
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    try:
        train_project(spec, store)
    except Rejection as e:  # too few tasks, nothing that supervises a mask: the project's data, not a failure
        store.update_job(spec.job_id, state="rejected", message=f"rejected, the served model stays: {e}")
        logger.info("project %s: training job %s rejected: %s", spec.project_id, spec.job_id, e)
    except Exception as e:  # reported, not raised: the parent only sees the exit code
        logger.exception("training job %s of project %s failed", spec.job_id, spec.project_id)
        store.update_job(spec.job_id, state="failed", message=f"{type(e).__name__}: {e}")


def train_project(spec: JobSpec, store: TrainingStore) -> None:
    import torch

    from dinov.build import SCORE_THRESHOLD_METADATA_KEY, load_model
    from dinov.checkpoint import file_digest
    from dinov.delta import apply_delta, read_delta, save_delta, trainable_names
    from dinov.predictor import DINOvPredictor, resolve_device
    from dinov.train.finetune import (
        best_threshold_figures,
        figures_at,
        finetune,
        finetune_config,
        form_thresholds,
        is_better,
    )
    from dinov.train.trainer import Trainer
    from labelstudio_backend.fetching.images import ImageLoader
    from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
    from labelstudio_backend.labelstudio.label_config import parse_label_config
    from labelstudio_backend.training.data import check_supervision, project_tasks, split_tasks, task_scene

    torch.set_num_threads(1)
    settings, job_id, pid = spec.settings, spec.job_id, spec.project_id
    started = time.monotonic()
    store.update_job(job_id, state="running", message="reading the annotated tasks", child_pid=os.getpid())
    config = parse_label_config(spec.label_config)
    client = LabelStudioClient.from_settings(settings)
    client.check_configured()
    tasks = {int(t["id"]): t for t in project_tasks(client, pid)}
    train_ids, val_ids = split_tasks(list(tasks), pid)
    images = ImageLoader(settings)
    train = [task_scene(tasks[t], config, images) for t in train_ids]
    val = [task_scene(tasks[t], config, images) for t in val_ids]
    check_supervision(train, pid)

    device = str(resolve_device(settings.device))
    model, model_config, base_digest = load_model(settings.checkpoint, cache_dir=settings.model_dir)
    active = store.active(pid)
    earlier: list[str] = []
    if active is not None and active.base_digest == base_digest and os.path.exists(active.path):
        metadata = apply_delta(model, active.path, base_digest)  # continue from what the project is served with
        model.default_score_threshold = float(metadata.get(SCORE_THRESHOLD_METADATA_KEY, active.score_threshold))
        earlier = list(read_delta(active.path)[0])
    collect = served_collector(settings, len(config.output_labels))
    pinned, threshold = served_threshold(settings, model)
    store.update_job(job_id, message="measuring the served model")
    # as annotators get it now: the served model at its served threshold
    before = figures_at(collect(DINOvPredictor(model, device=device), train, val), threshold,
                        lowered_until_found=pinned is None)

    on_gpu = device.startswith("cuda")
    steps = settings.train_steps
    minutes = settings.train_minutes or (15.0 if on_gpu else 10.0)
    trainer = Trainer(model, model_config, finetune_config(model_config, settings.train_parameters, steps), device=device)
    names = sorted(set(trainable_names(trainer.model)) | set(earlier))
    store.update_job(job_id, steps=steps, message="training")
    logger.info("project %s: job %s trains %s on %d tasks (%d for validation), at most %d steps or %.0f min on %s; "
                "before: %s", pid, job_id, settings.train_parameters, len(train), len(val), steps, minutes, device,
                before)
    last_write = [0.0]

    def progress(step: int, loss: float) -> None:
        if time.monotonic() - last_write[0] >= PROGRESS_EVERY_S or step == steps:
            last_write[0] = time.monotonic()
            store.update_job(job_id, step=step, message=f"training: step {step}/{steps}, loss {loss:.3f}")

    history = finetune(trainer, train, minutes * 60, on_progress=progress)
    store.update_job(job_id, step=trainer.step, message="measuring the trained model")
    trained = DINOvPredictor(trainer.model.eval(), device=device)
    collected = collect(trained, train, val)
    if pinned is not None:  # the project's SCORE_THRESHOLD applies to the new model too
        after = figures_at(collected, pinned, lowered_until_found=False)
    else:  # its own: among the thresholds making no more wrong regions than the served model, the best mIoU
        after = best_threshold_figures(collected, before["wrong_per_image"], lowered_until_found=True,
                                       thresholds=form_thresholds(trained))
    better, why = is_better(before, after)
    figures = {"before": before, "after": after, "steps": trainer.step, "train_tasks": len(train),
               "validation_tasks": len(val), "seconds": round(time.monotonic() - started, 1),
               "final_loss": history[-1]["total"] if history else None}
    if not better:
        store.update_job(job_id, state="rejected", message=f"not better, the served model stays: {why}",
                         figures=figures)
        logger.info("project %s: job %s rejected: %s", pid, job_id, why)
        return
    path = checkpoint_dir(settings) / f"project{pid}-job{job_id}.safetensors"
    save_delta(trainer.model, names, path, base_digest,
               metadata={"project": str(pid), "job": str(job_id),
                         SCORE_THRESHOLD_METADATA_KEY: str(after["score_threshold"])})
    checkpoint_id = f"{base_digest}+p{pid}-{file_digest(path)[:8]}"
    if not store.update_job(job_id, state="running", message="activating"):  # cancelled at the last moment
        path.unlink(missing_ok=True)
        return
    store.set_active(ActiveModel(project_id=pid, path=str(path), checkpoint_id=checkpoint_id,
                                 base_digest=base_digest, score_threshold=after["score_threshold"], job_id=job_id))
    store.update_job(job_id, state="done", message=f"better, now served: {why}", figures=figures)
    logger.info("project %s: job %s done, serving %s: %s", pid, job_id, checkpoint_id, why)
