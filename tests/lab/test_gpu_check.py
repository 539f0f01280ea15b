"""lab/gpu_check.sh on a machine without CUDA: a clear one-line message, no traceback, and
nothing run; its report renders partial results (what a stage that ran out of time leaves).

    uv run pytest tests/lab/test_gpu_check.py
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.slow  # the check's shell script as a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_check_without_cuda_says_so(tmp_path):
    r = subprocess.run(["bash", str(REPO / "lab" / "gpu_check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 2
    assert r.stderr.strip() == ("gpu_check: no CUDA device (torch.cuda.is_available() is False): "
                                "run this on a machine with an NVIDIA GPU")
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "out").exists()
    r = subprocess.run(["bash", str(REPO / "lab" / "gpu_check.sh")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert r.returncode == 2 and r.stderr.startswith("gpu_check: no /nonexistent/python")


def test_report_renders_partial_results():
    from lab import gpu_check
    res = {"device": "GPU", "torch": "2.11.0", "python": "3.12.3", "total_s": 455.0, "stages": {
        "cuda_tests": {"rc": 0, "seconds": 80.0, "summary": "6 passed in 79.1s"},
        "memory": {"rc": 124, "seconds": 110.0, "fineweb_gpt2": [
            {"B": 32, "dtype": "bfloat16", "params_m": 68.5, "peak_gb": 20.0, "estimate_gb": 22.0,
             "per_window_gb": 0.6, "step_ms": 150.0}, {"error": "out of memory: CUDA"}]},
        "train_ebt": {"rc": 0, "seconds": 60.0, "name": "ebt", "step_ms": 80.0,
                      "tokens_per_s": 204800.0, "peak_mem_gb": 12.5, "val_bpb": 2.5}}}
    md = gpu_check.markdown(res)
    assert "* cuda_tests: ok: 6 passed in 79.1s, 80 s" in md and "* memory: out of time" in md
    assert "* bench: not run (time)" in md
    assert "| ebt | 80.0 | 204,800 | 12.50 | 2.5000 |" in md
    assert "| fineweb_gpt2 | 68M | 32 | bfloat16 | 20.00 | 22.00 | 1.10 | 150 |" in md
    assert "out of memory: CUDA" in md
