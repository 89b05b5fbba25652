"""Settings from the environment and per-project overrides (labelstudio_backend/settings.py)."""

from __future__ import annotations

import dataclasses

import pytest

from labelstudio_backend.settings import SETTINGS_TABLE, Settings, SettingsError, describe_default


def test_settings_from_the_environment():
    defaults = Settings.from_env({})
    assert (defaults.port, defaults.workers, defaults.threads, defaults.checkpoint, defaults.device) == \
        (9090, 1, 8, "demo", "auto")
    assert defaults.max_examples_per_label == 16 and defaults.interactive_mode == "object"
    assert str(defaults.model_dir) == "model_dir" and defaults.basic_auth is None
    s = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080", "LABEL_STUDIO_ACCESS_TOKEN": "abc",
                           "ALLOWED_HOSTS": "a.example.com, *.cdn.example.com", "ALLOW_OVERLAP": "yes",
                           "SCORE_THRESHOLD": "0.45", "REFERENCES": "annotators", "REFERENCE_ANNOTATORS": "3,5",
                           "LOCAL_FILES_DOCUMENT_ROOT": "/data", "PORT": ""})
    assert s.label_studio_api_key == "abc" and s.allowed_hosts == ("a.example.com", "*.cdn.example.com")
    assert s.allow_overlap is True and s.score_threshold == 0.45 and s.reference_annotators == ("3", "5")
    assert str(s.local_files_root) == "/data" and s.port == 9090
    assert "abc" not in repr(s)  # secrets stay out of logs
    for env, message in (({"PORT": "http"}, "PORT='http'"), ({"SCORE_THRESHOLD": "2"}, "SCORE_THRESHOLD"),
                         ({"INTERACTIVE_MODE": "all"}, "object, similar"), ({"ALLOW_OVERLAP": "maybe"}, "true or"),
                         ({"REFERENCES": "annotators"}, "REFERENCE_ANNOTATORS"),
                         ({"LABEL_STUDIO_URL": "ls:8080"}, "full URL"), ({"BASIC_AUTH_USER": "u"}, "both set")):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(env)
    tuned = defaults.with_overrides({"SCORE_THRESHOLD": "0.6", "max_examples_per_label": 4})
    assert tuned.score_threshold == 0.6 and tuned.max_examples_per_label == 4
    assert defaults.with_overrides('{"interactive_mode": "similar"}').interactive_mode == "similar"
    with pytest.raises(SettingsError, match="not a per-project setting"):
        defaults.with_overrides({"max_image_bytes": 1})
    assert {row.env for row in SETTINGS_TABLE} >= {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "PORT",
                                                   "WORKERS", "THREADS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS",
                                                   "LOG_LEVEL", "DINOV_CHECKPOINT", "DEVICE"}


def test_the_table_covers_every_field_and_takes_its_defaults_from_the_dataclass():
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert {row.field for row in SETTINGS_TABLE} == set(fields)
    for row in SETTINGS_TABLE:
        assert row.default == describe_default(fields[row.field])
    assert (describe_default(80.0), describe_default(0.12), describe_default(False), describe_default(())) == \
        ("80", "0.12", "false", "(empty)")


def test_score_threshold_unset_means_the_checkpoints_own_default():
    assert Settings.from_env({}).score_threshold is None
    assert Settings.from_env({"SCORE_THRESHOLD": ""}).score_threshold is None
    assert Settings.from_env({"SCORE_THRESHOLD": "0.3"}).score_threshold == 0.3
    assert Settings.from_env({}).with_overrides({"score_threshold": 0.5}).score_threshold == 0.5
    with pytest.raises(SettingsError, match="SCORE_THRESHOLD"):
        Settings.from_env({"SCORE_THRESHOLD": "1.5"})


def test_security_settings_are_checked_at_start():
    assert Settings.from_env({}).max_request_bytes == 32 * 1024 * 1024
    assert Settings.from_env({"MAX_REQUEST_BYTES": "1048576"}).max_request_bytes == 1 << 20
    for env, message in (({"MAX_REQUEST_BYTES": "0"}, "MAX_REQUEST_BYTES"),
                         ({"BASIC_AUTH_USER": "a:b", "BASIC_AUTH_PASS": "p"}, "must not contain ':'"),
                         ({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p\u00e4ss"}, "printable ASCII"),
                         ({"ALLOWED_HOSTS": "cdn.example.com/images"}, "ALLOWED_HOSTS entry"),
                         ({"LABEL_STUDIO_URL": "http://user@ls:8080"}, "LABEL_STUDIO_URL"),
                         ({"LABEL_STUDIO_URL": "http://ls\\@evil:8080"}, "LABEL_STUDIO_URL")):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(env)
    allowed = Settings.from_env({"ALLOWED_HOSTS": "cdn.example.com, *.example.org, *, 10.0.0.0/8, [fd00::1]"})
    assert allowed.allowed_hosts == ("cdn.example.com", "*.example.org", "*", "10.0.0.0/8", "[fd00::1]")
