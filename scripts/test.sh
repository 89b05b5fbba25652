#!/usr/bin/env bash
# Run the whole test suite (unit, reference-identity, protocol and end-to-end against a real
# Label Studio) in the project's virtual environment, installing what it needs first.
source "$(dirname "$0")/_venv.sh" requirements-test.txt
set +e
python -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a broken test setup, not a pass" >&2
  exit 1
fi
exit "$status"
