# Sourced by the other scripts: make (once) and activate the project's virtual environment.
# VENV overrides its location (default: .venv in the repository root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
REQUIREMENTS="${1:-requirements.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# pip is quick when everything is already there; the stamp skips even that when nothing changed.
STAMP="$VENV/.installed-$(cat "$ROOT/$REQUIREMENTS" "$ROOT/requirements.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/$REQUIREMENTS"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
