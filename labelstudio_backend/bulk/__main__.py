"""`python -m labelstudio_backend.bulk ...`: the bulk job's command line (cli.py)."""

from __future__ import annotations

import sys

from labelstudio_backend.bulk.cli import main

sys.exit(main())
