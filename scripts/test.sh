#!/usr/bin/env bash
# Run the whole test suite in the project's virtual environment, installing what it needs first:
# the type checker (mypy) and the linter (ruff) over the project, then the tests (unit, reference-identity,
# protocol, and end-to-end against a real Label Studio, and the web-UI test in Debian's chromium).
source "$(dirname "$0")/_venv.sh" requirements-test.txt
# The browser test drives Debian's chromium (never a downloaded browser); install it when missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || echo "could not install chromium with apt-get; the browser test will fail" >&2
fi
mypy || { echo "mypy found type errors (above)" >&2; exit 1; }
ruff check . || { echo "ruff found lint errors (above)" >&2; exit 1; }
set +e
python -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a broken test setup, not a pass" >&2
  exit 1
fi
exit "$status"
