"""The backend as gunicorn serves it (`gunicorn tests.fault_app:app`), with the colour model double of
tests/support/doubles.py instead of DINOv, for the fault and load tests: real processes, sockets, SQLite and signals,
a model whose speed the test sets.

    FAULT_ENCODE_DELAY   seconds per encoded image (default 0)
    FAULT_WEBHOOK_DELAY  seconds more to apply each webhook event (default 0), to kill the process mid-way
    FAULT_MODEL_ERROR    when set, loading the model fails with this message (a checkpoint that cannot load)

Everything else (settings from the environment, the Label Studio sync) is built as _wsgi.py builds it.
"""

from __future__ import annotations

import logging
import os
import time

from labelstudio_backend.http.app import create_app
from labelstudio_backend.references.webhooks import WebhookInbox
from labelstudio_backend.settings import Settings
from tests.support.doubles import ColourPredictor


def _model_factory(settings: Settings) -> ColourPredictor:
    error = os.environ.get("FAULT_MODEL_ERROR")
    if error:
        raise OSError(error)
    return ColourPredictor(encode_delay=float(os.environ.get("FAULT_ENCODE_DELAY", "0")))


def _slow_apply(apply, delay: float):
    def slowly(self, stored):
        time.sleep(delay)
        return apply(self, stored)
    return slowly


def _build():
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    delay = float(os.environ.get("FAULT_WEBHOOK_DELAY", "0"))
    if delay:
        WebhookInbox.apply = _slow_apply(WebhookInbox.apply, delay)
    syncer = None
    if settings.label_studio_url and settings.label_studio_api_key:
        from labelstudio_backend.references.sync import make_syncer

        syncer = make_syncer(settings)
    return create_app(_model_factory, settings, syncer=syncer)


app = _build()
