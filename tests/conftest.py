import os
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With Label Studio, the
# backend and the tests sharing two cores, spinning threads made model calls up to 50x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from doubles import FakeLabelStudio  # noqa: E402 (after OMP_WAIT_POLICY)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The reference data lives in shared/ beside the checkout (see ../shared/dinov_reference/README.md).
REFERENCE_DIR = Path(os.environ.get("DINOV_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "dinov_reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "miniT_io.pt").exists():
        pytest.fail(f"DINOv reference data not found at {REFERENCE_DIR}; set DINOV_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture
def ls():
    """A fake Label Studio on 127.0.0.1 (tests/doubles.py)."""
    fake = FakeLabelStudio()
    yield fake
    fake.stop()
