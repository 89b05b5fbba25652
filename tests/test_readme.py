"""README's configuration table is generated from the settings; it must not drift from them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_current():
    table = subprocess.run([sys.executable, "scripts/settings_table.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={"PYTHONPATH": str(ROOT)}).stdout.strip()
    assert table in (ROOT / "README.md").read_text(), "regenerate the table: python scripts/settings_table.py"
