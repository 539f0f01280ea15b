"""The GPU check's driver (start it with lab/gpu_check.sh, which checks the machine first).

    python3 lab/gpu_check.py OUT_DIR [LIMIT_S]

Stages, each in its own process with a time limit, all inside LIMIT_S (default 480 s):
  cuda tests   pytest -m cuda (tests/test_cuda.py)
  memory       one fineweb_gpt2-sized step on random tokens (V=50,257): allocator peak against
               the pre-step estimate, at the preset's micro-batch (bf16 and fp32) and unsplit;
               then one step of each size preset (model=small..xl) at 8 windows
  train        train.py for 300 steps, the default config and its baseline (think_steps=0):
               step time, tokens/s, peak memory, val bpb
  bench        lab.bench device=cuda at the default size
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (a stage that failed or ran out of time
is recorded as such; the others still report).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
V_BPE = 50257
TRAIN_STEPS = 300
DEFAULT_SIZE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "data.block_size=256",
                "data.batch_size=64"]


# ------------------------------------------------------------------- stages (child processes)
def child_train(name: str, overrides: list[str]) -> dict:
    import torch
    from tests.conftest import compose
    from train import train
    cfg = compose(f"train.max_steps={TRAIN_STEPS}", f"train.eval_interval={TRAIN_STEPS}",
                  "train.log_interval=25", "train.save_interval=0",
                  f"out_dir=/tmp/gpu_check_runs/{name}", *overrides)
    t0 = time.time()
    summary = train(cfg)
    rows = [json.loads(r) for r in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tok_s = tok_s[2:] or tok_s  # past the warm-up
    tokens = cfg.data.batch_size * cfg.data.block_size * cfg.train.grad_accum_steps
    med = statistics.median(tok_s)
    return {"name": name, "overrides": overrides, "wall_s": time.time() - t0,
            "tokens_per_s": med, "step_ms": 1000 * tokens / med,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "val_bpb": summary.get("val_bpb"), "val_loss": summary.get("val_loss")}


def measure_step(overrides: list[str], B: int, dtype: str) -> dict:
    """Pre-step estimate and the allocator peak of two full steps on B random windows."""
    import torch
    from nanoebm import memory as M
    from nanoebm.runtime import autocast_for
    from tests.conftest import compose
    from tests.test_cuda import RandomTokens
    from nanoebm.model import EBT
    cfg = compose(*overrides)
    T = cfg.data.block_size
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU: no slow CPU init of the larger presets
        model = EBT(cfg.model.resolved(V_BPE, T))
    opt = torch.optim.AdamW(model.optim_groups(0.1, 1e-4, 10.0), lr=1e-4, fused=True)
    ac, _ = autocast_for("cuda", dtype)
    data = RandomTokens(V_BPE)
    row, fixed = M.step_estimate(model, data, T, "cuda", ac)
    x, y = data.get_batch("train", B, T, torch.Generator().manual_seed(0), "cuda")
    from nanoebm.losses import forward_backward
    times = []
    for _ in range(2):  # the second step has AdamW's moments, like every later one
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with ac:
            forward_backward(model, x, y, scale=1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    res = {"overrides": overrides, "B": B, "T": T, "dtype": dtype, "params_m": model.num_params() / 1e6,
           "peak_gb": peak / 1e9, "estimate_gb": (fixed + B * row) / 1e9,
           "per_window_gb": row / 1e9, "step_ms": 1000 * times[-1]}
    del model, opt
    torch.cuda.empty_cache()
    return res


def child_memory() -> dict:
    fw = ["experiment=fineweb_gpt2"]
    out = {"fineweb_gpt2": [], "sizes": {}}
    for B, dtype in ((32, "bfloat16"), (64, "bfloat16"), (32, "float32")):
        out["fineweb_gpt2"].append(_guard(measure_step, fw, B, dtype))
        print("RESULT " + json.dumps(out), flush=True)  # so far: a timeout keeps what is done
    for name in ("small", "medium", "large", "xl"):
        out["sizes"][name] = _guard(measure_step, [*fw, f"model={name}"], 8, "bfloat16")
        print("RESULT " + json.dumps(out), flush=True)
    return out


def _guard(fn, *args) -> dict:
    import torch
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}


# ------------------------------------------------------------------------------- the driver
def run_stage(args: list[str], limit: float, log) -> tuple[int, str, float]:
    """Run a child command; (return code (124 = out of time), output, seconds)."""
    t0 = time.time()
    try:
        p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=max(limit, 1))
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    log.write(f"$ {' '.join(args)}\n{out}\n[rc {rc}, {time.time() - t0:.0f}s]\n")
    log.flush()
    return rc, out, time.time() - t0


def child_result(out: str):
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def main(out_dir: Path, limit_s: float) -> dict:
    import torch
    t_start = time.time()
    deadline = t_start + limit_s - 25  # leave time to write the report
    left = lambda: deadline - time.time()  # noqa: E731
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "python": sys.version.split()[0], "limit_s": limit_s, "stages": {}}
    py, me = sys.executable, str(Path(__file__).resolve())
    log = open(out_dir / "gpu_check.log", "w")
    st = res["stages"]
    try:
        rc, out, s = run_stage([py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-rs",
                                "-p", "no:cacheprovider", f"--junitxml={out_dir / 'pytest.xml'}"],
                               min(170, left()), log)
        st["cuda_tests"] = {"rc": rc, "seconds": s, "summary": out.strip().splitlines()[-1] if out.strip() else ""}
        rc, out, s = run_stage([py, me, "--child", "memory"], min(110, left()), log)
        st["memory"] = {"rc": rc, "seconds": s, **(child_result(out) or {})}
        for name, extra in (("ebt", []), ("baseline", ["model.think_steps=0"])):
            rc, out, s = run_stage([py, me, "--child", "train", name, *extra],
                                   min(120, left()), log)
            st[f"train_{name}"] = {"rc": rc, "seconds": s, **(child_result(out) or {})}
        bench_json = out_dir / "bench_cuda.json"
        rc, out, s = run_stage([py, "-m", "lab.bench", "device=cuda", *DEFAULT_SIZE, f"out={bench_json}"],
                               min(150, left()), log)
        st["bench"] = {"rc": rc, "seconds": s}
        if rc == 0 and bench_json.exists():
            st["bench"].update(json.loads(bench_json.read_text()))
    finally:
        res["total_s"] = time.time() - t_start
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1))
        (out_dir / "gpu_check.md").write_text(markdown(res))
        log.close()
        print(markdown(res))
        print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return res


def markdown(res: dict) -> str:
    st = res["stages"]
    lines = [f"GPU check: {res['device']}, torch {res['torch']}, Python {res['python']}, "
             f"{res.get('total_s', 0):.0f} s", ""]
    for key in ("cuda_tests", "memory", "train_ebt", "train_baseline", "bench"):
        s = st.get(key)
        state = "not run (time)" if s is None else ("ok" if s["rc"] == 0 else
                                                   "out of time" if s["rc"] == 124 else f"failed (rc {s['rc']})")
        extra = f": {s['summary']}" if s and s.get("summary") else ""
        lines.append(f"* {key}: {state}{extra}" + (f", {s['seconds']:.0f} s" if s else ""))
    runs = [st[k] for k in ("train_ebt", "train_baseline") if st.get(k, {}).get("tokens_per_s")]
    if runs:
        lines += ["", f"train.py, {TRAIN_STEPS} steps (6 x 384, batch 64 x 256, bf16 autocast):", "",
                  "| run | step ms | tokens/s | peak memory GB | val bpb |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['peak_mem_gb']:.2f} | {r['val_bpb']:.4f} |" for r in runs]
    mem = st.get("memory", {})
    rows = [("fineweb_gpt2", m) for m in mem.get("fineweb_gpt2", [])] + \
        [(f"fineweb_gpt2 model={n}", m) for n, m in mem.get("sizes", {}).items()]
    if rows:
        lines += ["", f"one training step on random tokens, V={V_BPE:,} (T=256):", "",
                  "| config | params | windows | dtype | peak GB | estimate GB | estimate / peak | step ms |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for name, m in rows:
            if "error" in m:
                lines.append(f"| {name} | | | | {m['error']} | | | |")
                continue
            lines.append(f"| {name} | {m['params_m']:.0f}M | {m['B']} | {m['dtype']} | {m['peak_gb']:.2f} | "
                         f"{m['estimate_gb']:.2f} | {m['estimate_gb'] / m['peak_gb']:.2f} | {m['step_ms']:.0f} |")
    b = st.get("bench", {})
    if "train_step_ms_ebt" in b:
        lines += ["", "lab.bench device=cuda (6 x 384, batch 64 x 256):", "",
                  "| | baseline | EBT K=2 | ratio |", "|---|---:|---:|---:|",
                  f"| train step (ms) | {b['train_step_ms_baseline']:.1f} | {b['train_step_ms_ebt']:.1f} | "
                  f"{b['ebt_over_baseline']:.2f}x |",
                  f"| peak memory (MB) | {b['peak_mem_mb_baseline']:.0f} | {b['peak_mem_mb_ebt']:.0f} | "
                  f"{b['peak_mem_mb_ebt'] / b['peak_mem_mb_baseline']:.2f}x |",
                  f"| MFU | {100 * b['mfu_baseline']:.0f}% | {100 * b['mfu_ebt']:.0f}% | |",
                  f"| generation tok/s (cache / no cache) | | {b['gen_tokens_per_s_cache']:.0f} / "
                  f"{b['gen_tokens_per_s_nocache']:.0f} | {b['cache_speedup']:.2f}x |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        os.environ.setdefault("WANDB_MODE", "disabled")
        if sys.argv[2] == "memory":
            child_memory()
        else:
            print("RESULT " + json.dumps(child_train(sys.argv[3], sys.argv[4:])), flush=True)
    else:
        out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "results" / "gpu_check")
        out.mkdir(parents=True, exist_ok=True)
        main(out, float(sys.argv[2]) if len(sys.argv) > 2 else 480.0)
