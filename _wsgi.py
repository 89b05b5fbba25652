"""Serve the DINOv Label Studio ML backend.

Production (what scripts/start.sh and the Docker image run; no --preload: CUDA must start in each worker):

    gunicorn _wsgi:app --bind 0.0.0.0:9090 --workers 1 --threads 8 --timeout 0

Development server, and the leave-one-out quality estimate of a project as a command:

    python _wsgi.py --port 9090
    python _wsgi.py leave-one-out --project 3 [--max-tasks 50] [--label-config config.xml]

Fine-tune a project's model as Start Training does, and wait for the verdict (exit code 0: better, now served);
or serve the base model to the project again:

    python _wsgi.py train --project 3 [--label-config config.xml]
    python _wsgi.py train --project 3 --rollback

Every setting comes from the environment (labelstudio_backend/settings.py has the table). Listening
beyond 127.0.0.1 without BASIC_AUTH_USER/BASIC_AUTH_PASS logs a warning at start-up (gunicorn.conf.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from labelstudio_backend.settings import Settings, SettingsError


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")


def _build_app():
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        _configure_logging("INFO")
        logging.getLogger("dinov").error("invalid setting: %s", e)
        sys.exit(2)
    _configure_logging(settings.log_level)
    from labelstudio_backend.http.app import create_app

    return create_app(settings=settings, syncer=_label_studio_syncer(settings))


def _label_studio_syncer(settings: Settings):
    """The reference sync from the Label Studio API, when the sync module and a connection are configured."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    from labelstudio_backend.references.sync import make_syncer

    return make_syncer(settings)


app = _build_app()


def _train(runtime, args: argparse.Namespace) -> int:
    """python _wsgi.py train: a fine-tuning job of the project, waited for; or --rollback to the base model."""
    if args.rollback:
        previous = runtime.training.store.clear_active(args.project)
        print(f"project {args.project}: the base model is served again"
              + (f" (was {previous.checkpoint_id})" if previous else ""))
        return 0
    config = open(args.label_config).read() if args.label_config else \
        runtime.projects.load(args.project).get("label_config")
    job = runtime.training.start(args.project, config, runtime.projects.settings_for(args.project), "shell")
    print(f"project {args.project}: training job {job['job_id']} queued", flush=True)
    job = runtime.training.wait(args.project, timeout=24 * 3600)
    print(json.dumps(job, indent=2))
    return 0 if job and job["state"] == "done" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DINOv Label Studio ML backend")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=None, help="default: PORT (9090)")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    commands = parser.add_subparsers(dest="command")
    loo = commands.add_parser("leave-one-out", help="predict each annotated task from the others; IoU and recall")
    loo.add_argument("--project", type=int, required=True)
    loo.add_argument("--max-tasks", type=int, default=50)
    loo.add_argument("--label-config", help="labeling config XML file (default: the one /setup stored)")
    train = commands.add_parser("train", help="fine-tune the project's model now, as Start Training does")
    train.add_argument("--project", type=int, required=True)
    train.add_argument("--label-config", help="labeling config XML file (default: the one /setup stored)")
    train.add_argument("--rollback", action="store_true", help="serve the base model to the project again")
    args = parser.parse_args(argv)
    runtime = app.extensions["dinov"]

    if args.command == "train":
        try:
            return _train(runtime, args)
        finally:
            runtime.shutdown()  # the model load and the queues end before the interpreter does

    if args.command == "leave-one-out":
        from labelstudio_backend.serving.backend import DINOvBackend
        from labelstudio_backend.serving.leave_one_out import leave_one_out

        config = open(args.label_config).read() if args.label_config else None
        model = DINOvBackend(args.project, config, runtime=runtime)
        sync = runtime.ensure_synced(args.project, force=True)
        if sync is not None:
            sync.result()
        estimate = leave_one_out(model, max_tasks=args.max_tasks)
        runtime.projects.save_estimate(args.project, estimate)
        print(json.dumps(estimate, indent=2))
        return 0

    port = args.port or runtime.settings.port
    from labelstudio_backend.http.auth import exposure_warning

    warning = exposure_warning([(args.host, port)], runtime.settings.basic_auth is not None)
    if warning:  # under gunicorn, gunicorn.conf.py says the same
        logging.getLogger("dinov").warning(warning)
    app.run(host=args.host, port=port, debug=args.debug, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
