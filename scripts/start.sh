#!/usr/bin/env bash
# Start the backend under gunicorn on its embedded defaults (the demo model, MODEL_DIR=./model_dir,
# port 9090). Configure it with the environment variables of README.md.
source "$(dirname "$0")/_venv.sh" requirements.txt
exec gunicorn _wsgi:app --bind "0.0.0.0:${PORT:-9090}" --workers "${WORKERS:-1}" --threads "${THREADS:-8}" \
  --timeout 0 --log-level "$(echo "${LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"
