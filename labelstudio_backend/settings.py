"""Backend settings: one frozen dataclass, read from environment variables.

Each setting is declared once, as a field made by ``setting(default, ENV_VAR, meaning)``; ``SETTINGS_TABLE`` lists
variable, default and meaning from those fields, and the README's table is printed from it
(scripts/settings_table.py). The fields marked per-project can be overridden for one
Label Studio project through the "Extra params" JSON of the model connection, which Label Studio
sends to ``/setup`` as ``extra_params``; the others are operator-only, because they decide what the
backend may read (hosts, files, sizes) or how it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from labelstudio_backend.url_policy import HostPolicy, URLRefused

REFERENCE_MODES = ("all", "ground_truth", "annotators")
INTERACTIVE_MODES = ("object", "similar")
TRAIN_PARAMETERS = ("decoder", "decoder+pixel_decoder", "all")  # dinov.train.finetune.TRAINABLE
PROJECT_MODELS = ("active", "base")


class SettingsError(ValueError):
    """A setting has a value the backend cannot use; the message names the variable."""


def setting(default: Any, env: str, meaning: str, per_project: bool = False, secret: bool = False,
            maximum: float | None = None) -> Any:
    """A Settings field: its default, the environment variable that sets it, what it means (the README's
    table), whether a project's extra_params may override it, whether it is kept out of repr(), and the largest
    value accepted (None: no bound)."""
    return field(default=default, repr=not secret,
                 metadata={"env": env, "meaning": meaning, "per_project": per_project, "maximum": maximum})


@dataclass(frozen=True)
class Settings:
    # Connection to Label Studio and serving.
    label_studio_url: str = setting("", "LABEL_STUDIO_URL",
        "Label Studio's base URL as the backend reaches it, e.g. http://label-studio:8080. Needed for "
        "uploaded, local-storage and cloud-storage images and for the reference sync.")
    label_studio_api_key: str = setting("", "LABEL_STUDIO_API_KEY",
        "A legacy API token (sent as `Token <key>`) or a personal access token (a JWT, exchanged at "
        "/api/token/refresh/ for a Bearer access token). LABEL_STUDIO_ACCESS_TOKEN is read too.", secret=True)
    model_dir: Path = setting(Path("./model_dir"), "MODEL_DIR",
        "Where the reference store (SQLite), downloaded checkpoints, per-project settings and the image "
        "cache live.")
    port: int = setting(9090, "PORT",
        "Port of `python _wsgi.py` and scripts/start.sh.")
    workers: int = setting(1, "WORKERS",
        "gunicorn worker processes. Each loads its own model and feature cache; keep 1 per GPU.", maximum=1024)
    threads: int = setting(8, "THREADS",
        "Threads per worker; model work is serialised per device.", maximum=4096)
    basic_auth_user: str = setting("", "BASIC_AUTH_USER",
        "With BASIC_AUTH_PASS: every endpoint but /health requires HTTP basic auth; give Label Studio the "
        "same in the model connection (README: Deploy safely). Printable ASCII, no ':'.")
    basic_auth_pass: str = setting("", "BASIC_AUTH_PASS",
        "Password for basic auth (printable ASCII).", secret=True)
    max_request_bytes: int = setting(32 * 1024 * 1024, "MAX_REQUEST_BYTES",
        "Largest request body; larger ones are answered 413.", maximum=1099511627776)
    log_level: str = setting("INFO", "LOG_LEVEL",
        "DEBUG, INFO, WARNING or ERROR.")
    # The model.
    checkpoint: str = setting("demo", "DINOV_CHECKPOINT",
        "swinT or swinL (released weights, downloaded once into MODEL_DIR), demo, or a .pth/.safetensors "
        "path.")
    device: str = setting("auto", "DEVICE",
        "auto (CUDA when available), cuda, cuda:<i> or cpu.")
    model_load_retry_s: float = setting(5.0, "MODEL_LOAD_RETRY_S",
        "Seconds before a failed model load is tried again; doubled after each failure, at most 300. "
        "/health answers 503 with the reason meanwhile.", maximum=86400.0)
    # Background work.
    work_queue_size: int = setting(64, "WORK_QUEUE_SIZE",
        "Jobs that may wait in each background queue (model loading, webhooks, syncs, reference "
        "embedding, estimates, deferred predictions); a full queue answers 503 with Retry-After.", maximum=1000000)
    # Pre-annotation (per project).
    # None: the checkpoint's own calibrated threshold (0.12, the official demo's, for the released ones).
    score_threshold: float | None = setting(None, "SCORE_THRESHOLD",
        "Minimum instance score kept by pre-annotation. Unset: the checkpoint's own default (stored in "
        "its metadata, calibrated for the demo model; 0.12, the official demo's, for swinT/swinL).", per_project=True)
    max_instances_per_label: int = setting(20, "MAX_INSTANCES_PER_LABEL",
        "At most this many regions per label and image.", per_project=True, maximum=1000)
    min_area: int = setting(16, "MIN_AREA",
        "Drop predicted regions smaller than this many pixels.", per_project=True, maximum=1000000000)
    allow_overlap: bool = setting(False, "ALLOW_OVERLAP",
        "Whether masks of different labels may overlap; if false, a higher-scoring instance keeps the "
        "shared pixels.", per_project=True)
    polygon_tolerance: float = setting(1.5, "POLYGON_TOLERANCE",
        "Polygon simplification (Douglas-Peucker), in pixels; 0 keeps every contour point.", per_project=True, maximum=1000.0)
    references: str = setting("all", "REFERENCES",
        "Which annotations are in-context examples: all, ground_truth or annotators.", per_project=True)
    reference_annotators: tuple[str, ...] = setting((), "REFERENCE_ANNOTATORS",
        "Comma-separated annotator user ids, for REFERENCES=annotators.", per_project=True)
    max_examples_per_label: int = setting(16, "MAX_EXAMPLES_PER_LABEL",
        "In-context examples per label (most recent first).", per_project=True, maximum=1000)
    predict_time_budget: float = setting(80.0, "PREDICT_TIME_BUDGET",
        "Seconds a /predict call may spend (Label Studio waits ML_TIMEOUT_PREDICT=100 s); tasks left over "
        "are answered [] (Label Studio stores nothing for them) and finished in the background, which "
        "posts their predictions through the API.", per_project=True, maximum=86400.0)
    # Interactive refinement (per project).
    interactive_mode: str = setting("object", "INTERACTIVE_MODE",
        "object: a click/box/stroke gives that object's mask; similar: all similar objects in the image.", per_project=True)
    # What the backend may read (operator only).
    allowed_hosts: tuple[str, ...] = setting((), "ALLOWED_HOSTS",
        "Comma-separated extra hosts task images may come from: a name (any address), *.domain or * "
        "(public addresses only), an IP or CIDR (addresses inside it). Label Studio's origin and the "
        "presigned URLs it redirects to (public addresses) are always allowed.")
    local_files_root: Path | None = setting(None, "LOCAL_FILES_DOCUMENT_ROOT",
        "Read /data/local-files/?d=... from this directory (never outside it) instead of fetching it from "
        "Label Studio.")
    max_image_bytes: int = setting(64 * 1024 * 1024, "MAX_IMAGE_BYTES",
        "Largest image download or local file, in bytes.", maximum=1099511627776)
    max_image_pixels: int = setting(64_000_000, "MAX_IMAGE_PIXELS",
        "Largest image, width x height, checked from its header before decoding.", maximum=10000000000)
    image_cache_mb: int = setting(2048, "IMAGE_CACHE_MB",
        "Size bound of the downloaded-image cache in MODEL_DIR.", maximum=100000000)
    fetch_timeout: float = setting(30.0, "FETCH_TIMEOUT",
        "Seconds for a whole image download (redirects and every read) or one API request.", maximum=86400.0)
    verify_ssl: bool = setting(True, "VERIFY_SSL",
        "Verify TLS certificates when fetching.")
    feature_cache_size: int = setting(8, "FEATURE_CACHE_SIZE",
        "Encoded images kept per process, so the next click on the same image costs only the decoder.", maximum=10000)
    encode_ahead_tasks: int = setting(2, "ENCODE_AHEAD_TASKS",
        "When an annotator opens a task of a project with Sequential sampling, the next this many unlabeled "
        "tasks (by task id) are encoded and pre-annotated in the background, one image at a time and only while "
        "no request is being answered, so that opening them costs a cache hit; at most FEATURE_CACHE_SIZE - 1. "
        "Needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; 0: off.", maximum=1000)
    # Encodings of concurrent requests collected into one batch (None: 5 ms on CUDA, 0 = off on the CPU).
    batch_window_ms: float | None = setting(None, "BATCH_WINDOW_MS",
        "How long the first of several concurrent image encodings waits for others to share one batch. "
        "Unset: 5 ms on CUDA (a batch of 8 costs little more than one image), 0 (off) on the CPU.", maximum=10000)
    max_batch: int = setting(8, "MAX_BATCH",
        "Most images encoded in one batch.", maximum=1024)
    # Fine-tuning per project ("Start Training").
    train_steps: int = setting(2000, "TRAIN_STEPS",
        "Steps of a Start Training fine-tuning (cheap steps: 128x128 crops, 256 mask points; about 0.3 s each "
        "for the demo model on one CPU thread); TRAIN_MINUTES ends it earlier.", maximum=10000000)
    train_minutes: float = setting(0.0, "TRAIN_MINUTES",
        "Time limit of a fine-tuning's training loop, in minutes; 0: 10 on CPU, 15 on a GPU.", maximum=100000)
    train_parameters: str = setting("all", "TRAIN_PARAMETERS",
        "What a fine-tuning trains: all (the backbone at a tenth of the learning rate), decoder+pixel_decoder, "
        "or decoder (the transformer decoder and heads; backbone and pixel decoder frozen). For kinds of "
        "objects the model never saw, all learns far more per minute (BENCHMARKS.md, Start Training).")
    train_every_annotations: int = setting(0, "TRAIN_EVERY_ANNOTATIONS",
        "Also start a fine-tuning after this many new annotations (counted across workers and restarts, "
        "in MODEL_DIR's training store); 0: only on Start Training.", per_project=True, maximum=1000000)
    train_on_submission_tasks: int = setting(10, "TRAIN_ON_SUBMISSION_TASKS",
        "With Label Studio's project switch \"Start model training on annotation submission\" on (one "
        "START_TRAINING per saved annotation): start a job once this many tasks were annotated since the last "
        "one started (else TRAIN_QUIET_S after the last submission).", per_project=True, maximum=1000000)
    train_quiet_s: float = setting(300.0, "TRAIN_QUIET_S",
        "With that switch on: start a job this many seconds after the last submission; a running job is not "
        "cancelled by submissions (restarted only when the project has 1.5 times the annotated tasks it trains "
        "on).", per_project=True, maximum=86400.0)
    project_model: str = setting("active", "PROJECT_MODEL",
        "active: serve the project's fine-tuned checkpoint when it has one; base: serve the base model (a "
        "rollback that keeps the checkpoint).", per_project=True)
    project_models_in_memory: int = setting(2, "PROJECT_MODELS_IN_MEMORY",
        "Fine-tuned project models kept loaded per worker (each is a copy of the base model).", maximum=1000)

    def __post_init__(self) -> None:
        _check(self.batch_window_ms is None or self.batch_window_ms >= 0, "BATCH_WINDOW_MS", self.batch_window_ms,
               "a number of milliseconds >= 0, or unset for 5 ms on CUDA and 0 on the CPU")
        _check(self.max_batch >= 1, "MAX_BATCH", self.max_batch, "an integer >= 1")
        _check(self.score_threshold is None or 0.0 <= self.score_threshold <= 1.0, "SCORE_THRESHOLD",
               self.score_threshold, "a number in [0, 1], or unset for the checkpoint's default")
        _check(self.max_instances_per_label >= 1, "MAX_INSTANCES_PER_LABEL", self.max_instances_per_label, "an integer >= 1")
        _check(self.min_area >= 0, "MIN_AREA", self.min_area, "an integer >= 0 (pixels)")
        _check(self.polygon_tolerance >= 0, "POLYGON_TOLERANCE", self.polygon_tolerance, "a number >= 0 (pixels)")
        _check(self.references in REFERENCE_MODES, "REFERENCES", self.references, f"one of {', '.join(REFERENCE_MODES)}")
        _check(all(a.isdigit() for a in self.reference_annotators), "REFERENCE_ANNOTATORS",
               ",".join(self.reference_annotators), "comma-separated Label Studio user ids")
        _check(self.references != "annotators" or bool(self.reference_annotators), "REFERENCE_ANNOTATORS",
               "", "a comma-separated list of annotator user ids when REFERENCES=annotators")
        _check(self.max_examples_per_label >= 1, "MAX_EXAMPLES_PER_LABEL", self.max_examples_per_label, "an integer >= 1")
        _check(self.predict_time_budget > 0, "PREDICT_TIME_BUDGET", self.predict_time_budget, "a number of seconds > 0")
        _check(self.interactive_mode in INTERACTIVE_MODES, "INTERACTIVE_MODE", self.interactive_mode,
               f"one of {', '.join(INTERACTIVE_MODES)}")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "DEVICE", self.device,
               "auto, cpu, cuda or cuda:<index>")
        _check(1 <= self.port <= 65535, "PORT", self.port, "a TCP port")
        _check(self.workers >= 1 and self.threads >= 1, "WORKERS/THREADS", (self.workers, self.threads), "integers >= 1")
        _check(self.max_image_bytes > 0 and self.max_image_pixels > 0, "MAX_IMAGE_BYTES/MAX_IMAGE_PIXELS",
               (self.max_image_bytes, self.max_image_pixels), "positive integers")
        _check(self.feature_cache_size >= 1, "FEATURE_CACHE_SIZE", self.feature_cache_size, "an integer >= 1")
        _check(self.encode_ahead_tasks >= 0, "ENCODE_AHEAD_TASKS", self.encode_ahead_tasks, "an integer >= 0 (0: off)")
        _check(self.train_steps >= 1, "TRAIN_STEPS", self.train_steps, "an integer >= 1")
        _check(self.train_minutes >= 0, "TRAIN_MINUTES", self.train_minutes, "a number >= 0 (0: the device's default)")
        _check(self.train_parameters in TRAIN_PARAMETERS, "TRAIN_PARAMETERS", self.train_parameters,
               f"one of {', '.join(TRAIN_PARAMETERS)}")
        _check(self.train_every_annotations >= 0, "TRAIN_EVERY_ANNOTATIONS", self.train_every_annotations,
               "an integer >= 0 (0: only Start Training)")
        _check(self.train_on_submission_tasks >= 1, "TRAIN_ON_SUBMISSION_TASKS", self.train_on_submission_tasks,
               "an integer >= 1")
        _check(self.train_quiet_s >= 0, "TRAIN_QUIET_S", self.train_quiet_s, "a number of seconds >= 0")
        _check(self.project_model in PROJECT_MODELS, "PROJECT_MODEL", self.project_model,
               f"one of {', '.join(PROJECT_MODELS)}")
        _check(self.project_models_in_memory >= 1, "PROJECT_MODELS_IN_MEMORY", self.project_models_in_memory,
               "an integer >= 1")
        _check_upper_bounds(self)
        _check(self.max_request_bytes > 0, "MAX_REQUEST_BYTES", self.max_request_bytes, "a positive integer")
        _check(self.model_load_retry_s > 0, "MODEL_LOAD_RETRY_S", self.model_load_retry_s, "a number of seconds > 0")
        _check(self.work_queue_size >= 1, "WORK_QUEUE_SIZE", self.work_queue_size, "an integer >= 1")
        _check(bool(self.basic_auth_user) == bool(self.basic_auth_pass), "BASIC_AUTH_USER/BASIC_AUTH_PASS",
               "one of them", "both set (basic auth on) or both empty (off)")
        if self.basic_auth_user:
            try:
                validate_credentials(self.basic_auth_user, self.basic_auth_pass)
            except ValueError as e:
                raise SettingsError(str(e)) from None
        if self.label_studio_url:
            _check(self.label_studio_url.startswith(("http://", "https://")), "LABEL_STUDIO_URL",
                   self.label_studio_url, "a full URL such as http://label-studio:8080")
        try:  # the same parser and rules as every fetch (no DNS question here)
            HostPolicy.from_settings(self.label_studio_url, self.allowed_hosts)
        except URLRefused as e:
            raise SettingsError(str(e)) from None

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @property
    def db_path(self) -> Path:
        return self.model_dir / "references.sqlite3"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `environ` (default: os.environ); unset variables keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for row in SETTINGS_TABLE:
            raw = environ.get(row.env)
            if raw is None and row.env == "LABEL_STUDIO_API_KEY":
                raw = environ.get("LABEL_STUDIO_ACCESS_TOKEN")  # the name older label-studio-ml backends read
            if raw is None or raw == "" and row.field not in ("label_studio_url", "label_studio_api_key"):
                continue
            values[row.field] = _parse(row.field, raw, row.env)
        return cls(**values)

    def with_overrides(self, params: Mapping[str, Any] | str | None) -> Settings:
        """A copy with the per-project fields of `params` (the backend's extra_params) applied.

        Keys are the field names or the environment variable names, in any case:
        ``{"score_threshold": 0.5}`` and ``{"SCORE_THRESHOLD": "0.5"}`` mean the same.
        """
        params = parse_extra_params(params)
        changes: dict[str, Any] = {}
        for key, raw in params.items():
            name = _PER_PROJECT_KEYS.get(str(key).lower())
            if name is None:
                raise SettingsError(
                    f"extra_params key {key!r} is not a per-project setting; allowed keys: "
                    f"{', '.join(sorted(PER_PROJECT_FIELDS))}")
            changes[name] = _parse(name, raw, f"extra_params[{key!r}]")
        return dataclasses.replace(self, **changes) if changes else self


def parse_extra_params(params: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """extra_params arrive as a JSON object, a JSON string, or nothing."""
    if params is None or params == "":
        return {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as e:
            raise SettingsError(f"extra_params is not valid JSON ({e}); give a JSON object such as "
                                '{"score_threshold": 0.5}') from None
    if not isinstance(params, Mapping):
        raise SettingsError(f"extra_params must be a JSON object, got {type(params).__name__}")
    return dict(params)


@dataclass(frozen=True)
class SettingRow:
    """One line of the settings table, read from a Settings field's declaration."""

    env: str
    field: str
    meaning: str
    per_project: bool
    default: str  # as the README shows it ("(empty)" for an empty string, tuple or None)


def describe_default(value: Any) -> str:
    """A default value as text: 80.0 -> "80", False -> "false", Path("model_dir") -> "./model_dir"."""
    if value in ("", (), None):
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value}"
    return str(value)


SETTINGS_TABLE: tuple[SettingRow, ...] = tuple(
    SettingRow(f.metadata["env"], f.name, f.metadata["meaning"], f.metadata["per_project"], describe_default(f.default))
    for f in dataclasses.fields(Settings))
PER_PROJECT_FIELDS = frozenset(row.field for row in SETTINGS_TABLE if row.per_project)
_PER_PROJECT_KEYS = {key: row.field for row in SETTINGS_TABLE if row.per_project
                     for key in (row.field, row.env.lower())}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}
_ENV_NAMES = {row.field: row.env for row in SETTINGS_TABLE}


def _parse(name: str, raw: Any, source: str) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(raw, bool) or isinstance(raw, float) and not (math.isfinite(raw) and raw.is_integer()):
                raise ValueError("expected an integer")
            if isinstance(raw, str) and not _ASCII_INT.fullmatch(raw.strip()):
                raise ValueError("expected an integer in ASCII digits")
            return int(raw)
        if kind in ("float", "float | None"):
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            if kind == "float | None" and (raw is None or str(raw).strip() == ""):
                return None
            if isinstance(raw, str) and not _ASCII_FLOAT.fullmatch(raw.strip()):
                raise ValueError("expected a number in ASCII digits")
            number = float(raw)
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if kind == "Path":
            return Path(str(raw)).expanduser()
        if kind == "Path | None":
            return Path(str(raw)).expanduser() if str(raw) else None
        if kind == "tuple[str, ...]":
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        return str(raw).strip()
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{source}={raw!r} is not valid: {e}") from None


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,19}")
_ASCII_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")

# Upper bounds of the numbers a request (extra_params) or the environment may set: beyond them a value is a
# mistake or an attack (max_examples_per_label=1e21 made every /predict of the project fail).
# Upper bounds of the numbers a request (extra_params) or the environment may set (each setting's `maximum`):
# beyond them a value is a mistake or an attack (max_examples_per_label=1e21 made every /predict of the project fail).
UPPER_BOUNDS = {f.name: f.metadata["maximum"] for f in dataclasses.fields(Settings) if f.metadata["maximum"] is not None}


def _check_upper_bounds(settings: Any) -> None:
    for name, bound in UPPER_BOUNDS.items():
        value = getattr(settings, name, None)
        if value is not None and not value <= bound:
            raise SettingsError(f"{_ENV_NAMES.get(name, name)}={value!r} is not valid: expected at most {bound}")
    annotators = getattr(settings, "reference_annotators", ())
    if len(annotators) > 1000 or not all(a.isascii() and len(a) <= 19 for a in annotators):
        raise SettingsError("REFERENCE_ANNOTATORS is not valid: expected at most 1000 user ids in ASCII digits")


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{name}={value!r} is not valid: expected {expected}")


def validate_credentials(user: str, password: str) -> None:
    """Raise ValueError unless `user` and `password` can travel in a basic auth header unchanged.

    Label Studio's client (requests) encodes them as Latin-1; printable ASCII reads the same everywhere.
    """
    for name, value in (("BASIC_AUTH_USER", user), ("BASIC_AUTH_PASS", password)):
        if not value:
            raise ValueError(f"{name} is empty; set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if not all(0x20 <= ord(c) <= 0x7E for c in value):
            raise ValueError(f"{name} must be printable ASCII (Label Studio sends it Latin-1 encoded, so other "
                             "characters would not match)")
    if ":" in user:
        raise ValueError("BASIC_AUTH_USER must not contain ':' (basic auth separates user and password with it)")
