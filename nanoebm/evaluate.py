"""The thinking-curve evaluator: val loss after k = 0..N inference think steps, paired.

Every k is measured on the same batches from the same initial candidate (the S1 logits, or noise
drawn from a per-batch seeded generator), so differences between k are the effect of thinking
alone. One chain of N steps gives every k <= N, because step k never depends on N.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think


@torch.no_grad()
def position_curve(model: EBT, x: torch.Tensor, y: torch.Tensor, steps: int, *,
                   generator: torch.Generator | None = None, think_lr: float | None = None,
                   keep_logits: bool = False) -> dict:
    """Per-position CE (nats) of one batch at think steps k = 0..steps, from one chain:
    ce_k (B, T, steps+1), energy_k (B, T, steps+1) of z_0..z_steps (empty when steps=0),
    ce_s1 (B, T) when the model has an S1 head, and the candidates z_k themselves on request."""
    ctx = model.context(x)
    mode = "s1" if steps == 0 and model.has_s1 else None  # K=0: the model is its S1 LM
    z0 = initial_logits(model, ctx, x.shape[1], mode=mode, generator=generator)
    out = think(model, ctx, z0, steps, noise=0.0, lr=think_lr, final_energy=steps > 0,
                generator=generator)
    zs = [z0] + out.logits
    res = {"ce_k": torch.stack([ce(z, y, reduction="none").view(y.shape) for z in zs], -1),
           "hit_k": torch.stack([z.argmax(-1) == y for z in zs], -1),  # (B, T, steps+1) argmax right
           "ctx": ctx}
    if steps > 0:
        res["energy_k"] = torch.stack([e.float() for e in out.energies + [out.final_energy]], -1)
    if model.has_s1:
        res["ce_s1"] = ce(ctx.s1_logits, y, reduction="none").view(y.shape)
    if keep_logits:
        res["logits"] = zs
    return res


@torch.no_grad()
def thinking_curve(model: EBT, batches, steps: int, *, seed: int = 0, autocast=None,
                   think_lr: float | None = None) -> dict:
    """Mean CE (nats/token) over `batches` [(x, y), ...] at think steps 0..steps, plus the S1
    CE when the model has an S1 head and the mean energy at each visited candidate."""
    was_training = model.training
    model.eval()
    ctx_mgr = autocast or nullcontext()
    n = len(batches)
    loss_k = torch.zeros(steps + 1)
    energy_k = torch.zeros(steps + 1)
    loss_s1 = 0.0
    for i, (x, y) in enumerate(batches):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)  # same noise for every k
        with ctx_mgr:
            r = position_curve(model, x, y, steps, generator=gen, think_lr=think_lr)
        loss_k += r["ce_k"].mean((0, 1)).cpu() / n
        if steps > 0:
            energy_k += r["energy_k"].mean((0, 1)).cpu() / n
        if model.has_s1:
            loss_s1 += r["ce_s1"].mean().item() / n
    model.train(was_training)
    res = {"loss_k": loss_k.tolist(), "energy_k": energy_k.tolist() if steps > 0 else []}
    if model.has_s1:
        res["loss_s1"] = loss_s1
    return res


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


def curve_metrics(curve: dict, bits_name: str, prefix: str = "val_") -> dict:
    """Flatten a thinking curve into log keys: val_loss (after thinking), val_perplexity,
    val_bpb|val_bpt, the S1 versions, and val_loss_k{k} / val_{bits}_k{k} for every k."""
    ln2 = math.log(2)
    m = {}
    final = curve["loss_k"][-1]
    m[f"{prefix}loss"] = final
    m[f"{prefix}perplexity"] = math.exp(min(final, 50.0))
    m[f"{prefix}{bits_name}"] = final / ln2
    if "loss_s1" in curve:
        m[f"{prefix}loss_s1"] = curve["loss_s1"]
        m[f"{prefix}perplexity_s1"] = math.exp(min(curve["loss_s1"], 50.0))
        m[f"{prefix}{bits_name}_s1"] = curve["loss_s1"] / ln2
    for k, v in enumerate(curve["loss_k"]):
        m[f"{prefix}loss_k{k}"] = v
        m[f"{prefix}{bits_name}_k{k}"] = v / ln2
    return m


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
