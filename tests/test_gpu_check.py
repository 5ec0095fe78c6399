"""bench/gpu_check.py on a machine without CUDA: every part says it skipped, exit 0, the report is written
unless a report measured on a GPU is there (kept as it was), and it names the commit it ran on."""

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
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
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
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert f"- commit: {head or 'unknown'}" in text


def _cpu_run(script: Path, report: Path, *parts: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script), "--report", str(report)] + (["--only", ",".join(parts)] if parts else [])
    return subprocess.run(cmd, cwd=script.parents[1], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


GPU_REPORT = "# GPU check, 2026-12-04T13:27:06+00:00\n\n- device: NVIDIA H200; host vm, python 3.12.3\n\n## tests\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run bench/gpu_check.py itself")
def test_a_run_without_a_gpu_keeps_a_gpu_report_and_replaces_its_own(tmp_path):
    report = tmp_path / "gpu_check.md"
    report.write_text(GPU_REPORT)
    proc = _cpu_run(ROOT / "bench" / "gpu_check.py", report, "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report.read_text() == GPU_REPORT  # byte for byte: the GPU's figures survive
    assert "kept (measured on NVIDIA H200)" in proc.stdout
    report.write_text(GPU_REPORT.replace("NVIDIA H200", "no GPU"))  # a report of a run without a GPU is replaced
    assert _cpu_run(ROOT / "bench" / "gpu_check.py", report, "tests").returncode == 0
    assert "tests: no GPU: skipped" in report.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run bench/gpu_check.py itself")
def test_a_report_outside_a_git_checkout_says_commit_unknown(tmp_path):
    script = tmp_path / "copy" / "bench" / "gpu_check.py"  # a copy of the script in a folder git knows nothing of
    script.parent.mkdir(parents=True)
    script.write_text((ROOT / "bench" / "gpu_check.py").read_text())
    report = tmp_path / "r.md"
    proc = _cpu_run(script, report, "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "- commit: unknown" in report.read_text()


def test_gpu_check_refuses_unknown_parts(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "tests,warp", "--report",
                           str(tmp_path / "r.md")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "unknown part(s) warp" in proc.stderr
    assert not (tmp_path / "r.md").exists()
