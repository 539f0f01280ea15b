"""Scoring fixed windows: per-position results of the thinking curve (nanoebm.losses'
position_curve), best-of-N by lowest final energy, and paired bootstrap intervals over windows.
Batch i of a set draws its chain noise from a generator seeded seed + i, so every scorer of
the same windows sees the same chains.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from nanoebm.losses import ce, position_curve
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think


@torch.no_grad()
def best_of_n(model: EBT, ctx, z0: torch.Tensor, steps: int, n: int, noise: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-verification: n noisy chains of `steps` steps from z0 (B, T, V); per position keep
    the final candidate whose energy is lowest. Returns the kept candidates (B, T, V)."""
    finals, energies = [], []
    for _ in range(n):
        out = think(model, ctx, z0, steps, noise=noise, final_energy=True, generator=generator)
        finals.append(out.final)
        energies.append(out.final_energy)
    pick = torch.stack(energies).argmin(0)  # (B, T): lowest-energy chain per position
    return torch.stack(finals).gather(0, pick[None, ..., None].expand(1, *finals[0].shape))[0]


@torch.no_grad()
def best_of_n_loss(model: EBT, batches, steps: int, n: int, noise: float, *, seed: int = 0) -> float:
    """Mean CE of best-of-n over `batches`, each batch's chains seeded seed + i."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i, (x, y) in enumerate(batches):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)
        ctx = model.context(x)
        z0 = initial_logits(model, ctx, x.shape[1], generator=gen)
        total += ce(best_of_n(model, ctx, z0, steps, n, noise, gen), y).item() / len(batches)
    model.train(was_training)
    return total


# ----------------------------------------------------------------- scoring a fixed set
def window_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device):
    """(xb, yb, generator) for windows x, y (N, T), batch by batch; batch i's generator is
    seeded seed + i, so every scorer of the same windows draws the same chain noise."""
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        yield xb, yb, torch.Generator(device=xb.device).manual_seed(seed + i // batch_size)


@torch.no_grad()
def score_windows(model: EBT, x: torch.Tensor, y: torch.Tensor, steps: int, *, trained_k: int,
                  bon: int = 0, think_noise: float = 0.5, batch_size: int = 32, seed: int = 0,
                  device="cpu", autocast=None) -> dict:
    """Per-position results on windows x, y (N, T), batch by batch as thinking_curve does
    (batch i's chain seeded seed + i): ce_k and hit_k (argmax right) (N, T, steps+1), energy_k
    (N, T, steps+1), ce_s1 (N, T) and, with bon > 1, ce_bon and hit_bon (N, T) of best-of-bon
    chains of trained_k steps."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}
    for xb, yb, gen in window_batches(x, y, batch_size, seed, device):
        with autocast or nullcontext():
            r = position_curve(model, xb, yb, steps, generator=gen)
            if bon > 1 and trained_k > 0:
                z0 = initial_logits(model, r["ctx"], xb.shape[1], generator=gen)
                z = best_of_n(model, r["ctx"], z0, trained_k, bon, think_noise, gen)
                r["ce_bon"] = ce(z, yb, reduction="none").view(yb.shape)
                r["hit_bon"] = z.argmax(-1) == yb
        for key in ("ce_k", "hit_k", "energy_k", "ce_s1", "ce_bon", "hit_bon"):
            if key in r:
                parts.setdefault(key, []).append(r[key].float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of v (N, T) over the scored positions."""
    return (v * mask).sum().item() / max(int(mask.sum()), 1)


def paired_bootstrap(d: torch.Tensor, mask: torch.Tensor, n_boot: int = 1000, seed: int = 0):
    """Mean of a paired difference d (N, T) over the masked positions and its 95% interval,
    resampling whole windows (positions inside a window are not independent)."""
    s, n = (d * mask).sum(1).double(), mask.sum(1).double()  # (N,) per-window sums and counts
    mean = (s.sum() / n.sum().clamp_min(1)).item()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(s), (n_boot, len(s)), generator=g)  # (n_boot, N) resampled windows
    boot = s[idx].sum(1) / n[idx].sum(1).clamp_min(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return mean, lo, hi
