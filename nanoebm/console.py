"""The lines train.py prints and the rows it logs: formatting only, no training logic.

    step    201/2000 | loss 4.4180 | ppl 9.11 | bpb 3.187 | lr 9.94e-04 | alpha 0.658 |
        E -0.167->-0.199 | ce_k 2.211/2.204/2.209 | 0.5k tok/s | eta 49m33s      (one line)
    eval step 250: val_loss 1.9876 | val_bpb 2.8675 | S1 1.9803 | ... by think step k=0..: ...
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager


class Clock:
    """Training wall-clock: evaluation time is taken out of elapsed_s and of tokens/s."""

    def __init__(self):
        self.t0 = self.last = time.time()
        self.excluded = 0.0  # seconds spent evaluating

    def total(self) -> float:
        return time.time() - self.t0

    def elapsed(self) -> float:
        """Training seconds so far: evaluations left out."""
        return time.time() - self.t0 - self.excluded

    def lap(self) -> float:
        """Training seconds since the previous lap (the previous log line)."""
        now = time.time()
        dt, self.last = now - self.last, now
        return dt

    @contextmanager
    def paused(self):
        t = time.time()
        yield
        dt = time.time() - t
        self.excluded += dt
        self.last += dt


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_row(step: int, loss: float, metrics: dict, lr: float, alpha: float, bits: str,
              tokens_per_s: float, tokens: int, elapsed_s: float) -> dict:
    """One metrics.jsonl row: the loss, the training CE after thinking (S1 CE for the baseline)
    as ce/ppl/bits, and every metric ebt_loss returned (device tensors, synced here)."""
    ce = (metrics["ce_think"] if "ce_think" in metrics else metrics["ce_s1"]).item()
    return {"step": step, "elapsed_s": elapsed_s, "loss": loss, "ce": ce,
            "ppl": math.exp(min(ce, 50)), bits: ce / math.log(2), "lr": lr,
            "alpha": alpha, "tokens_per_s": tokens_per_s,
            "tokens": tokens, **{k: v.item() for k, v in metrics.items() if k != "ce_think"}}


def train_line(row: dict, max_steps: int, bits: str, eta_s: float | None) -> str:
    """The console line for a train_row: thinking and shaping fields only where they exist."""
    extra = ""
    if "energy_before" in row:  # thinking: alpha, energy before->after, CE after each step
        ks, k = [], 0
        while f"ce_k{k}" in row:
            ks.append(f"{row[f'ce_k{k}']:.3f}")
            k += 1
        extra = (f" | alpha {row['alpha']:.3f} | E {row['energy_before']:.3f}"
                 f"->{row['energy_after']:.3f} | ce_k {'/'.join(ks)}")
    if "energy_margin" in row:
        extra += f" | margin {row['energy_margin']:.2f}"
    if "cd_loss" in row:  # contrastive phases, persistent-chain bookkeeping
        extra += f" | cd {row['cd_loss']:.3f} E+ {row['E_pos']:.2f} E- {row['E_neg']:.2f}"
        if "buffer_fill" in row:
            extra += f" fill {row['buffer_fill']:.2f} restarts {row['restarts']:.0f}"
    return (f"step {row['step']:6d}/{max_steps} | loss {row['loss']:.4f} | ppl {row['ppl']:.2f} | "
            f"{bits} {row[bits]:.3f} | lr {row['lr']:.2e}{extra} | "
            f"{row['tokens_per_s'] / 1e3:.1f}k tok/s | eta {'?' if eta_s is None else fmt_time(eta_s)}")


def eval_line(step: int, m: dict, bits: str) -> str:
    """The console line for an evaluation's metrics (evaluate.curve_metrics keys)."""
    s1 = f" | S1 {m['val_loss_s1']:.4f}" if "val_loss_s1" in m else ""
    em = f" | margin {m['val_energy_margin']:.3f}" if "val_energy_margin" in m else ""
    ks, k = [], 0
    while f"val_loss_k{k}" in m:
        ks.append(f"{m[f'val_loss_k{k}']:.3f}")
        k += 1
    return (f"eval step {step}: val_loss {m['val_loss']:.4f} | val_{bits} {m['val_' + bits]:.4f}"
            f"{s1}{em} | val_loss by think step k=0..: {' '.join(ks)}")
