"""lab.bench quick=true runs end to end and writes bench.json with every key (tiny sizes here;
the benchmark itself is not a timed test).

    uv run pytest tests/lab/test_bench.py
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # lab.bench as a subprocess

KEYS = ["train_step_ms_baseline", "train_step_ms_ebt", "ebt_over_baseline",
        "ebt_truncated_over_baseline", "peak_mem_mb_ebt_k4", "tokens_per_s_baseline",
        "tokens_per_s_ebt", "peak_mem_mb_baseline", "peak_mem_mb_ebt", "mfu_baseline", "mfu_ebt",
        "gen_tokens_per_s_cache", "gen_tokens_per_s_nocache", "cache_speedup", "device", "dtype",
        "torch", "config", "flops_per_step_ebt", "flops_per_step_baseline"]


def test_bench_quick_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "lab.bench", "quick=true", "model.n_layer=1", "model.n_head=2",
                        "model.n_embd=32", "data.block_size=16", "data.batch_size=4",
                        "gen_block_size=40", "gen_tokens=8", "threads=1", "gen_compile=false",
                        f"out={out}"],  # compiled generation: tests/test_think_at.py
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(KEYS) <= set(res)
    assert res["train_step_ms_ebt"] > 0 and res["train_step_ms_baseline"] > 0
    # the EBT does strictly more work: thinking adds counted FLOPs and saved activations
    assert res["flops_per_step_ebt"] > 2 * res["flops_per_step_baseline"]
    assert res["peak_mem_mb_ebt"] > res["peak_mem_mb_baseline"]
    assert 0 < res["mfu_ebt"] < 1 and res["config"]["model"]["n_layer"] == 1
    assert "train step ms" in r.stdout and "generation tok/s" in r.stdout
