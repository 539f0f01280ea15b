"""Benchmark, in one run: EBT vs its baseline (think_steps=0) at the same size.

    uv run python -m lab.bench                 # CPU bench config: 4L/4H/128d, block 64, batch 12
    uv run python -m lab.bench quick=true      # about a minute
    uv run python -m lab.bench model.think_steps=3 data.batch_size=32 device=cuda

Measures full training steps (forward, thinking, backward, optimizer; warm-up then the median of
interleaved rounds), peak memory (CUDA: the allocator's peak; CPU: parameters + gradients +
AdamW state + the peak of tensors autograd holds for backward), FLOPs per step (counted by
torch's FlopCounterMode, double backward included) and MFU against a measured matmul peak, and
generation tokens/s with and without the KV cache, thinking generation with its think step
compiled (gen_compile=true) and each as a multiple of a System-1 token's cost. Prints a table,
writes bench.json.
Ratios are what to compare: they come from one run on one (possibly busy) machine.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

import hydra
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from nanoebm import runtime as rt
from lab.config import BenchConfig
from lab.meter import state_bytes
from nanoebm.cli import apply_cli_shims, register_configs
from nanoebm.data import load_data
from nanoebm.generate import generate
from nanoebm.losses import forward_backward
from nanoebm.memory import SavedBytes
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Variant:
    """One model + optimizer + fixed batch; .step() is one full training step."""

    def __init__(self, name, cfg, data, device, autocast, compile_ctx: bool):
        self.name, self.device, self.autocast = name, device, autocast
        torch.manual_seed(cfg.seed)
        self.model = EBT(cfg.model.resolved(data.vocab_size, cfg.data.block_size)).to(device).train()
        if compile_ctx:
            self.model.context = torch.compile(self.model.context)
        groups = self.model.optim_groups(0.1, 1e-4, self.model.cfg.think_lr_lr_multiplier)
        self.opt = torch.optim.AdamW(groups, lr=1e-4, fused=device.startswith("cuda"))
        g = torch.Generator().manual_seed(cfg.seed)
        B, T = cfg.data.batch_size, cfg.data.block_size
        self.x, self.y = data.get_batch("train", B, T, g, device)
        self.times = []

    def step(self):
        with self.autocast:
            loss, _ = forward_backward(self.model, self.x, self.y)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def timed_step(self):
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        self.times.append(1000 * (time.perf_counter() - t0))

    def peak_mem_mb(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.step()
            sync(self.device)
            return torch.cuda.max_memory_allocated() / 2**20
        sb = SavedBytes(self.model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(sb.pack, sb.unpack):
            self.step()
        return (sb.peak + state_bytes(self.model, self.opt)) / 2**20

    def flops(self) -> int:
        with FlopCounterMode(display=False) as fc:
            self.step()
        return fc.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the denominator of MFU."""
    n = 2048 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def gen_speed(cfg: BenchConfig, data, device, autocast) -> dict:
    """Tokens/s generating gen_tokens after a prompt that fills the rest of gen_block_size."""
    torch.manual_seed(cfg.seed)
    model = EBT(cfg.model.resolved(data.vocab_size, cfg.gen_block_size)).to(device).eval()
    prompt_len = cfg.gen_block_size - cfg.gen_tokens
    full = data.get_batch("val", 1, cfg.gen_block_size, torch.Generator().manual_seed(0), device)[0]
    idx = full[:, :prompt_len]  # (1, prompt_len)
    res = {}
    runs = [("cache", dict(kv_cache=True)), ("nocache", dict(kv_cache=False)),
            ("cache_s1", dict(kv_cache=True, use_thinking=False)),  # context stream alone
            ("nocache_s1", dict(kv_cache=False, use_thinking=False))]
    if cfg.gen_compile:  # a short run compiles the think step; the timed run reuses the graph
        with autocast:
            res["compile_s"] = generate(model, idx, 2, think_steps=cfg.gen_think_steps,
                                        report_energy=False, compile=True).compile_seconds
        runs.append(("cache_compiled", dict(kv_cache=True, compile=True)))
    for name, kw in runs:  # nothing reads the energies here: no final-energy pass
        with autocast:
            out = generate(model, idx, cfg.gen_tokens, think_steps=cfg.gen_think_steps,
                           report_energy=False, **kw)
        res[name] = cfg.gen_tokens / out.seconds
    # the reference's way: per token, the whole window through the context AND every think step
    n, t0 = max(4, cfg.gen_tokens // 8), time.perf_counter()
    with autocast:
        for i in range(n):
            seq = full[:, :prompt_len + i]  # the window grows by one token per step
            ctx = model.context(seq)
            z0 = initial_logits(model, ctx, seq.shape[1])
            think(model, ctx, z0, cfg.gen_think_steps)
    sync(device)
    res["naive"] = n / (time.perf_counter() - t0)
    return res


def run(cfg: BenchConfig) -> dict:
    if cfg.quick:
        cfg = dataclasses.replace(cfg, warmup=1, iters=5, gen_tokens=min(cfg.gen_tokens, 32))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rt.pick_device(cfg.device)
    autocast, dtype = rt.autocast_for(device, cfg.dtype)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    data = load_data(cfg.data)
    K = cfg.model.think_steps or 2
    mk = lambda **kw: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **kw))  # noqa: E731
    variants = {"baseline": mk(think_steps=0), "ebt": mk(think_steps=K),
                "ebt_truncated": mk(think_steps=K, truncate_refine=True),
                "ebt_k4": mk(think_steps=4)}
    vs = {n: Variant(n, c, data, device, autocast, cfg.compile) for n, c in variants.items()}
    for v in vs.values():
        for _ in range(cfg.warmup):
            v.step()
    for _ in range(cfg.iters):  # interleaved rounds: machine noise hits every variant alike
        for v in vs.values():
            v.timed_step()
    ms = {n: statistics.median(v.times) for n, v in vs.items()}
    mem = {n: v.peak_mem_mb() for n, v in vs.items()}
    flops = {n: vs[n].flops() for n in ("baseline", "ebt")}
    peak = matmul_peak(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    gen = gen_speed(cfg, data, device, autocast)
    tokens = cfg.data.batch_size * cfg.data.block_size
    res = {
        "train_step_ms_baseline": ms["baseline"], "train_step_ms_ebt": ms["ebt"],
        "train_step_ms_ebt_truncated": ms["ebt_truncated"], "train_step_ms_ebt_k4": ms["ebt_k4"],
        "ebt_over_baseline": ms["ebt"] / ms["baseline"],
        "ebt_truncated_over_baseline": ms["ebt_truncated"] / ms["baseline"],
        "tokens_per_s_baseline": tokens / ms["baseline"] * 1000,
        "tokens_per_s_ebt": tokens / ms["ebt"] * 1000,
        "peak_mem_mb_baseline": mem["baseline"], "peak_mem_mb_ebt": mem["ebt"],
        "peak_mem_mb_ebt_truncated": mem["ebt_truncated"], "peak_mem_mb_ebt_k4": mem["ebt_k4"],
        "flops_per_step_baseline": flops["baseline"], "flops_per_step_ebt": flops["ebt"],
        "flops_ebt_over_baseline": flops["ebt"] / flops["baseline"],
        "matmul_peak_flops": peak,
        "mfu_baseline": flops["baseline"] / (ms["baseline"] / 1000) / peak,
        "mfu_ebt": flops["ebt"] / (ms["ebt"] / 1000) / peak,
        "gen_tokens_per_s_cache": gen["cache"], "gen_tokens_per_s_nocache": gen["nocache"],
        "gen_tokens_per_s_naive": gen["naive"],
        "cache_speedup": gen["cache"] / gen["nocache"],
        "cache_speedup_vs_naive": gen["cache"] / gen["naive"],
        "gen_tokens_per_s_s1_cache": gen["cache_s1"], "gen_tokens_per_s_s1_nocache": gen["nocache_s1"],
        "cache_speedup_s1": gen["cache_s1"] / gen["nocache_s1"],  # no thinking: the cache's own gain
        # a thinking token's cost in System-1 tokens (cached generation both)
        "gen_think_cost_over_s1": gen["cache_s1"] / gen["cache"],
        **({"gen_tokens_per_s_cache_compiled": gen["cache_compiled"],
            "gen_compile_seconds": gen["compile_s"],
            "gen_compiled_speedup": gen["cache_compiled"] / gen["cache"],
            "gen_think_compiled_cost_over_s1": gen["cache_s1"] / gen["cache_compiled"]}
           if cfg.gen_compile else {}),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else
        f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype, "torch": torch.__version__, "think_steps": K,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    print_table(res)
    return res


def print_table(r: dict) -> None:
    rows = [("train step ms", r["train_step_ms_baseline"], r["train_step_ms_ebt"],
             f"{r['ebt_over_baseline']:.2f}x (truncated {r['ebt_truncated_over_baseline']:.2f}x)"),
            ("tokens/s", r["tokens_per_s_baseline"], r["tokens_per_s_ebt"], ""),
            ("peak memory MB", r["peak_mem_mb_baseline"], r["peak_mem_mb_ebt"],
             f"{r['peak_mem_mb_ebt'] / r['peak_mem_mb_baseline']:.2f}x (K=4: {r['peak_mem_mb_ebt_k4']:.1f})"),
            ("GFLOP / step", r["flops_per_step_baseline"] / 1e9, r["flops_per_step_ebt"] / 1e9,
             f"{r['flops_ebt_over_baseline']:.2f}x"),
            ("MFU %", 100 * r["mfu_baseline"], 100 * r["mfu_ebt"],
             f"peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")]
    print(f"device {r['device']} | dtype {r['dtype']} | torch {r['torch']} | think_steps {r['think_steps']}")
    print(f"{'':16s} {'baseline':>10s} {'EBT':>10s}  ratio")
    for name, a, b, note in rows:
        print(f"{name:16s} {a:10.2f} {b:10.2f}  {note}")
    print(f"generation tok/s (EBT, {r['config']['gen_think_steps']} think steps): cache "
          f"{r['gen_tokens_per_s_cache']:.1f} | no cache {r['gen_tokens_per_s_nocache']:.1f} "
          f"({r['cache_speedup']:.2f}x) | naive full recompute {r['gen_tokens_per_s_naive']:.1f} "
          f"({r['cache_speedup_vs_naive']:.1f}x) | System 1 only: {r['gen_tokens_per_s_s1_cache']:.1f} vs "
          f"{r['gen_tokens_per_s_s1_nocache']:.1f} ({r['cache_speedup_s1']:.1f}x)")
    line = (f"thinking generation (cache): eager {r['gen_tokens_per_s_cache']:.1f} tok/s = "
            f"{r['gen_think_cost_over_s1']:.1f}x a System-1 token")
    if "gen_tokens_per_s_cache_compiled" in r:
        line += (f" | compiled {r['gen_tokens_per_s_cache_compiled']:.1f} tok/s = "
                 f"{r['gen_think_compiled_cost_over_s1']:.1f}x ({r['gen_compiled_speedup']:.2f}x "
                 f"eager; compiling took {r['gen_compile_seconds']:.1f}s)")
    print(line)


@hydra.main(version_base="1.3", config_path="configs", config_name="bench")
def main(cfg) -> None:
    try:
        bc: BenchConfig = OmegaConf.to_object(cfg)
        res = run(bc)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tmp = bc.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, bc.out)  # atomic: a crash never leaves half a bench.json
    print(f"wrote {bc.out}")


if __name__ == "__main__":
    apply_cli_shims(schema=BenchConfig)
    register_configs({"base_bench": BenchConfig})
    main()
