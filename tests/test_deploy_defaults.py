"""Deployment defaults: Docker runs the released Swin-T, start.sh the demo model and says what it is."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docker_image_and_compose_default_to_the_released_swin_t():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^\s*DINOV_CHECKPOINT=swinT\b", dockerfile, re.M)
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    assert re.search(r"^\s*DINOV_CHECKPOINT: \$\{DINOV_CHECKPOINT:-swinT\}\s*$", compose, re.M)
    # the checkpoint lands in the volume, so it is downloaded once
    assert "MODEL_DIR: /data/model_dir" in compose and "model_dir:/data/model_dir" in compose
    # the score threshold is the backend's own default (the official rule), not pinned by compose
    assert "SCORE_THRESHOLD" not in compose


def test_start_script_keeps_the_demo_default_and_says_how_to_switch(tmp_path):
    script = (ROOT / "scripts" / "start.sh").read_text()
    # run only the notice: everything between sourcing the venv and starting gunicorn
    notice = script.split("requirements.txt\n", 1)[1].split("exec gunicorn", 1)[0]
    for env, expect in (({}, True), ({"DINOV_CHECKPOINT": "demo"}, True), ({"DINOV_CHECKPOINT": "swinT"}, False)):
        done = subprocess.run(["bash", "-c", notice], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                              text=True, check=True)
        assert ("generated shapes" in done.stderr and "DINOV_CHECKPOINT=swinT" in done.stderr) is expect, done.stderr
