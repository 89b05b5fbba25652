#!/usr/bin/env bash
# Start the backend under gunicorn on its embedded defaults (the demo model, MODEL_DIR=./model_dir,
# port 9090). Configure it with the environment variables of README.md; DINOV_CHECKPOINT=swinT for real images.
source "$(dirname "$0")/_venv.sh" requirements.txt
if [ "${DINOV_CHECKPOINT:-demo}" = "demo" ]; then
  # Say it where the operator looks first: the demo model segments generated shapes, not real images.
  echo "$(date -u '+%Y-%m-%d %H:%M:%S') start.sh: DINOV_CHECKPOINT=demo: the embedded demo model is trained on" \
       "generated shapes only (dinov/data/scenes.py), for trying the backend out. For real images use the" \
       "released weights: DINOV_CHECKPOINT=swinT (or swinL), downloaded once into MODEL_DIR." >&2
fi
exec gunicorn _wsgi:app --bind "0.0.0.0:${PORT:-9090}" --workers "${WORKERS:-1}" --threads "${THREADS:-8}" \
  --timeout 0 --log-level "$(echo "${LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"
