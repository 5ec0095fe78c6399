"""bench/gpu_check.py on a machine without CUDA: every part says it skipped, the report is written, exit 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run bench/gpu_check.py itself")
def test_gpu_check_without_a_gpu_skips_every_part(tmp_path):
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--report", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    lines = proc.stdout.splitlines()
    assert [ln for ln in lines if ln.endswith("no GPU: skipped")] == [f"{p}: no GPU: skipped" for p in gpu_check.PARTS]
    text = report.read_text()
    assert "device: no GPU" in text and text.count("no GPU: skipped") == len(gpu_check.PARTS)


def test_gpu_check_refuses_unknown_parts(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "tests,warp", "--report",
                           str(tmp_path / "r.md")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) warp" in proc.stderr
    assert not (tmp_path / "r.md").exists()
