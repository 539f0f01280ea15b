"""The measured points behind docs/gpu.md's memory tables, at the GPT-2 vocabulary (50,257).

    uv run python -m lab.memory_points               # CPU: saved-bytes meter, ~10 minutes
    uv run python -m lab.memory_points --quick       # the fineweb_gpt2 points only
    uv run python -m lab.memory_points --table       # re-print results/memory_points.json

For the fineweb_gpt2 preset (6 x 384, T=256) the saved-bytes meter at B = 1, 2, 4 windows (its
linearity in B*T), without thinking (K=0), under bf16 autocast, and the allocation peak that
torch's profiler records at B = 1, 2 (what the meter's rule must predict); for every size preset the
parameter count and the meter at 1 and 2 layers (every layer is the same, so the figure is exact-
ly linear in depth), extrapolated to the preset's depth. Estimated peak per window = the CPU
rule of nanoebm/memory.py without the resident-set factor, i.e. what a GPU allocator would hold.
Writes results/memory_points.json and prints markdown tables.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoebm import memory as M  # noqa: E402
from nanoebm.config import ModelConfig  # noqa: E402
from nanoebm.losses import forward_backward  # noqa: E402
from nanoebm.model import EBT  # noqa: E402

V, T = 50257, 256
SIZES = {"small": (12, 12, 768), "medium": (24, 16, 1024), "large": (24, 16, 1536),
         "xl": (24, 32, 2048)}


def saved_bytes(mc: ModelConfig, B: int, bf16: bool = False) -> int:
    """Peak bytes autograd holds in one training step on B random windows of T tokens."""
    torch.manual_seed(0)
    model = EBT(mc).train()
    x, y = torch.randint(V, (B, T)), torch.randint(V, (B, T))
    meter = M.SavedBytes(model.parameters())
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack), ac:
        forward_backward(model, x, y, scale=1.0)
    return meter.peak


def alloc_peak(mc: ModelConfig, B: int) -> int:
    """Peak bytes of live tensor allocations over one training step on B windows (torch's
    profiler records every allocation and free): the check of the CPU rule below."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = EBT(mc).train()
    x, y = torch.randint(V, (B, T)), torch.randint(V, (B, T))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(model, x, y, scale=1.0)
    now = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        now += n
        peak = max(peak, now)
    return peak


def alloc_per_window(saved: float, think: bool) -> float:
    """The CPU rule's allocation peak per window (memory.step_bytes without RSS_OVER_ALLOC)."""
    return M.ALLOC_OVER_SAVED * saved + (M.V_TRANSIENTS * T * V * 4 if think else 0)


def n_params(mc: ModelConfig) -> int:
    with torch.device("meta"):
        return EBT(mc).num_params()


def main(quick: bool) -> dict:
    torch.set_num_threads(1)
    base = ModelConfig(vocab_size=V, block_size=T)  # the fineweb_gpt2 model (dropout 0.1 too)
    res, t0 = {"V": V, "T": T, "torch": torch.__version__, "fineweb_gpt2": {}}, time.time()
    fw = res["fineweb_gpt2"]
    fw["params"] = n_params(base)
    fw["saved_by_B"] = {B: saved_bytes(base, B) for B in (1, 2, 4)}
    fw["saved_k0_B1"] = saved_bytes(ModelConfig(**{**base.__dict__, "think_steps": 0}), 1)
    fw["saved_bf16_by_B"] = {B: saved_bytes(base, B, bf16=True) for B in (1, 2)}
    fw["alloc_by_B"] = {B: alloc_peak(base, B) for B in (1, 2)}
    print(f"fineweb_gpt2 points: {time.time() - t0:.0f}s", flush=True)
    if not quick:
        res["sizes"] = {}
        for name, (L, H, D) in SIZES.items():
            mk = lambda n: ModelConfig(n_layer=n, n_head=H, n_embd=D, vocab_size=V,  # noqa: E731
                                       block_size=T)
            s1, s2 = saved_bytes(mk(1), 1), saved_bytes(mk(2), 1)
            res["sizes"][name] = {"layers": L, "heads": H, "dims": D, "params": n_params(mk(L)),
                                  "saved_L1": s1, "saved_L2": s2, "saved": s1 + (L - 1) * (s2 - s1)}
            print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    return res


def tables(res: dict) -> str:
    fw, out = res["fineweb_gpt2"], []
    ints = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731  (JSON keys are strings)
    sv, al, bf = ints(fw["saved_by_B"]), ints(fw["alloc_by_B"]), ints(fw["saved_bf16_by_B"])
    out += ["| windows B | B*T tokens | saved bytes (meter) | per token |", "|---:|---:|---:|---:|"]
    out += [f"| {B} | {B * T} | {s / 1e6:.1f} MB | {s / (B * T) / 1e3:.0f} kB |" for B, s in sv.items()]
    n = np.array(list(sv), float) * T
    fit = np.polyval(np.polyfit(n, list(sv.values()), 1), n)
    r2 = 1 - ((np.array(list(sv.values())) - fit) ** 2).sum() / np.var(list(sv.values())) / len(n)
    per_tok, k0 = sv[1] / T, fw["saved_k0_B1"] / T
    out += ["", f"R^2 of a line through the three points: {r2:.6f}",
            f"allocation peak per window (profiler, B=2 minus B=1): {(al[2] - al[1]) / 1e6:.0f} MB; "
            f"the CPU rule from the meter: {alloc_per_window(sv[1], True) / 1e6:.0f} MB",
            f"per (token x think step), K=2 minus K=0 (one step's graph alive at a time): "
            f"{(per_tok - k0) / 1e3:.0f} kB; K=0: {k0 / 1e3:.0f} kB/token; under bf16 autocast, "
            f"K=2: {(bf[2] - bf[1]) / T / 1e3:.0f} kB/token (B=2 minus B=1: the bf16 weight "
            f"copies, {(2 * bf[1] - bf[2]) / 1e6:.0f} MB, are per step)"]
    fixed = 16 * fw["params"]
    for name, saved in (("fp32", sv[1]), ("bf16 autocast", bf[2] - bf[1])):
        row = alloc_per_window(saved, True)
        out.append(f"fineweb_gpt2 estimated peak, {name}: {row / 1e9:.3f} GB per window + "
                   f"{fixed / 1e9:.2f} GB fixed -> 64 windows {(fixed + 64 * row) / 1e9:.1f} GB, "
                   f"32 windows {(fixed + 32 * row) / 1e9:.1f} GB")
    if "sizes" in res:
        out += ["", "| preset | layers/heads/dims | params (V=50,257) | weights+grads+AdamW | saved per "
                "window | est. peak per window | 8 windows | 32 windows | micro-batch <= 40 GB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in res["sizes"].items():
            row, fixed = alloc_per_window(s["saved"], True), 16 * s["params"]
            fits = max([b for b in (1, 2, 4, 8, 16, 32, 64) if fixed + b * row <= 40e9], default=0)
            out.append(f"| {name} | {s['layers']}/{s['heads']}/{s['dims']} | {s['params'] / 1e6:.0f}M | "
                       f"{fixed / 1e9:.1f} GB | {s['saved'] / 1e9:.2f} GB | {row / 1e9:.2f} GB | "
                       f"{(fixed + 8 * row) / 1e9:.1f} GB | {(fixed + 32 * row) / 1e9:.1f} GB | "
                       f"{fits} x {64 // fits if fits else '-'} |")
    return "\n".join(out)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "results" / "memory_points.json"
    if "--table" in sys.argv:  # re-print the tables of the last run
        print(tables(json.loads(out.read_text())))
        sys.exit()
    res = main("--quick" in sys.argv)
    out.write_text(json.dumps(res, indent=1))
    print(tables(json.loads(json.dumps(res))))
    print(f"wrote {out}")
