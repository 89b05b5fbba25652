"""Where the repository and the shared reference data are, for tests at any depth of tests/."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The reference data lives in shared/ beside the checkout (see ../shared/dinov_reference/README.md).
REFERENCE_DIR = Path(os.environ.get("DINOV_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "dinov_reference"))
