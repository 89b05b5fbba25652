"""Per-project records in MODEL_DIR/projects/: the labeling config and extra_params /setup received, and the
last leave-one-out estimate.

Label Studio sends extra_params to /setup only, and /predict may reach another gunicorn worker, so these live
in files (written atomically) rather than in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labelstudio_backend.labelstudio.payload import read_json, utc_now, write_json
from labelstudio_backend.runtime.bounded import PROJECTS_MAX, LRUCache
from labelstudio_backend.settings import Settings, parse_extra_params


class ProjectRecords:
    """The files of each project under settings.model_dir / "projects"."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.estimates: LRUCache[int, dict] = LRUCache(PROJECTS_MAX)  # this process's newest estimates

    def _file(self, project_id: int) -> Path:
        return self.settings.model_dir / "projects" / f"{project_id}.json"

    def _estimate_file(self, project_id: int) -> Path:
        return self._file(project_id).with_suffix(".estimate.json")

    def save(self, project_id: int, extra_params: Any, label_config: str | None) -> None:
        """Keep the project's extra_params (refused with SettingsError when a value is bad) and config."""
        params = parse_extra_params(extra_params)
        self.settings.with_overrides(params)  # refuse bad values before keeping them
        write_json(self._file(project_id), {"extra_params": params, "label_config": label_config,
                                            "updated_at": utc_now()})

    def load(self, project_id: int) -> dict:
        """{"extra_params", "label_config", "updated_at"}, or {} for a project never set up."""
        return read_json(self._file(project_id)) or {}

    def settings_for(self, project_id: int | None) -> Settings:
        """The process's settings with the project's extra_params applied."""
        if project_id is None:
            return self.settings
        return self.settings.with_overrides(self.load(project_id).get("extra_params"))

    def save_estimate(self, project_id: int, estimate: dict) -> None:
        self.estimates.put(project_id, estimate)
        write_json(self._estimate_file(project_id), estimate)

    def load_estimate(self, project_id: int) -> dict | None:
        """The last leave-one-out estimate (this process's, or one another worker wrote)."""
        return self.estimates.get(project_id) or read_json(self._estimate_file(project_id))

    def forget(self, project_id: int) -> None:
        self.estimates.pop(project_id)
        for path in (self._file(project_id), self._estimate_file(project_id)):
            try:
                path.unlink()
            except OSError:
                pass
