"""scripts/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU and the JSON report is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import REPO_ROOT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    env = {**os.environ, "PYTHON": sys.executable}
    completed = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_runs_every_step(dry_run):
    assert dry_run["dry_run"] is True and dry_run["device"] == "cpu"
    assert set(dry_run["steps"]) == {"cuda_tests", "bf16_vs_fp32", "bench_swin_t_b1", "bench_swin_t_b2",
                                     "bench_swin_l_b1", "bench_swin_l_b2", "click_latency"}
    assert all(step["ok"] for step in dry_run["steps"].values()), dry_run["steps"]
    assert dry_run["all_steps_ok"] is True


def test_dry_run_report_has_the_figures(dry_run):
    tests = dry_run["cuda_tests"]
    assert tests["tests"] >= 5 and tests["failures"] == 0 and tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]  # without CUDA every cuda test is skipped, none fails
    for kind in ("click", "generic", "referring"):
        agreement = dry_run["bf16_vs_fp32"][kind]
        assert agreement["n"] >= 1 and 0.0 <= agreement["min_iou"] <= agreement["mean_iou"] <= 1.0
    for key, batch in (("swin_t_b1", 1), ("swin_t_b2", 2), ("swin_l_b1", 1), ("swin_l_b2", 2)):
        figures = dry_run["bench"][key]
        for stage in ("encode_image_s", "generic_s", "generic_decode_s", "generic_upsample_s", "decode_referring_s"):
            assert figures[stage] > 0, (key, stage)
        assert figures["images_per_s"] == pytest.approx(batch / figures["encode_image_s"])
    assert dry_run["latency"]["click_ms"] > 0 and dry_run["latency"]["generic_with_post_ms"] > 0
    assert dry_run["peak_gpu_memory_mb"] is None and dry_run["peak_memory_mb"] > 0
    assert set(dry_run["goals"]) == {"swin_t_images_per_s", "swin_l_images_per_s", "click_ms", "bf16_mean_iou"}
    for goal in dry_run["goals"].values():
        assert goal["measured"] is not None and goal["met"] in (True, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_real_check_refuses(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "dinov.tools.gpu_check", "--out", str(tmp_path / "r.json")],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "--dry-run" in completed.stderr
