"""model_version: what Label Studio stores with each prediction and shows, shortened, on the prediction tabs.

    model_version(runtime.model_for(3), settings)     # "p3j7-dinov-demo-a3ed1b15+p3-7ab40343-5c2e9f"
    project_versions(runtime, 3, settings)            # {"versions": [project model, base], "served": ...}
    all_versions(runtime)                             # without a project: what Label Studio 1.23.2 asks

It changes when the served model or a setting that changes predictions changes, never with the references
(annotations): Label Studio asks again only for predictions of another version, so new annotations do not pile
up tabs. Label Studio 1.23.2 shows a name longer than 15 characters as its first 8, "..." and its last 6, so
both ends tell versions apart: the start names the served model ("base", or "p<project>j<job>" for the project's
fine-tuned checkpoint of that training job) and the end is a digest of the whole (model and settings).
"""

from __future__ import annotations

import hashlib
import json

from labelstudio_backend.runtime.runtime import Runtime, ServedModel
from labelstudio_backend.serving.project_models import served_project_model
from labelstudio_backend.settings import PER_PROJECT_FIELDS, Settings

# the per-project settings that change predictions (not those that only decide when training starts, nor
# PROJECT_MODEL, whose effect is the served model itself)
PREDICTION_FIELDS = frozenset(f for f in PER_PROJECT_FIELDS if not f.startswith("train_") and f != "project_model")


def model_version(model: ServedModel, settings: Settings) -> str:
    """The version of a served model (the base model or a project's, Runtime.model_for) with `settings`."""
    active = served_project_model(model)
    served = str(model.model_name)
    tuned = {name: getattr(settings, name) for name in sorted(PREDICTION_FIELDS)}
    digest = hashlib.sha1(json.dumps([served, str(model.checkpoint_id), tuned], sort_keys=True,
                                     default=str).encode()).hexdigest()[:6]
    head = f"p{active.project_id}j{active.job_id}" if active is not None else "base"
    return f"{head}-dinov-{served}-{digest}"


def project_versions(runtime: Runtime, project_id: int, settings: Settings) -> dict:
    """Label Studio's /versions of a project: the base model's version and, when the project has a fine-tuned
    model that can be served, its version; `served` is the one predictions are made with now."""
    base = model_version(runtime, settings)
    served = model_version(runtime.model_for(project_id), settings)
    versions = [base] if served == base else [served, base]
    active = runtime.training.store.active(project_id) if runtime.training is not None else None
    return {"versions": versions, "served": served, "project": project_id,
            "project_model": None if active is None else {"checkpoint": active.checkpoint_id, "job": active.job_id,
                                                          "served": served != base}}


def all_versions(runtime: Runtime) -> dict:
    """/versions without a project, as Label Studio 1.23.2 asks it (ml/api_connector.py get_versions passes the
    project as a JSON body to a GET, which its client drops): the base model's version (the process's settings)
    and every project's served fine-tuned model's (each named by its project and job)."""
    settings_for = runtime.projects.settings_for
    base = model_version(runtime, settings_for(None))
    projects = runtime.training.store.projects() if runtime.training is not None else []
    tuned = []
    for project_id in projects:
        model = runtime.model_for(project_id)
        if served_project_model(model) is not None:
            tuned.append(model_version(model, settings_for(project_id)))
    return {"versions": [*tuned, base], "served": None, "project": None}
