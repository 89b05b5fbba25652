import os
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With Label Studio, the
# backend and the tests sharing two cores, spinning threads made model calls up to 50x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests.support.doubles import FakeLabelStudio  # noqa: E402 (after OMP_WAIT_POLICY)
from tests.support.paths import REFERENCE_DIR  # noqa: E402


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "miniT_io.pt").exists():
        pytest.fail(f"DINOv reference data not found at {REFERENCE_DIR}; set DINOV_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture
def ls():
    """A fake Label Studio on 127.0.0.1 (tests/support/doubles.py)."""
    fake = FakeLabelStudio()
    yield fake
    fake.stop()
