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
            ctx = model.context(x)
            if model.has_s1:
                loss_s1 += ce(ctx.s1_logits, y).item() / n
            mode = "s1" if steps == 0 and model.has_s1 else None  # K=0: the model is its S1 LM
            z0 = initial_logits(model, ctx, x.shape[1], mode=mode, generator=gen)
            out = think(model, ctx, z0, steps, noise=0.0, lr=think_lr, final_energy=steps > 0,
                        generator=gen)
        for k, z in enumerate([z0] + out.logits):
            loss_k[k] += ce(z, y).item() / n
        if steps > 0:
            es = out.energies + [out.final_energy]
            energy_k += torch.stack([e.float().mean().cpu() for e in es]) / n
    model.train(was_training)
    res = {"loss_k": loss_k.tolist(), "energy_k": energy_k.tolist() if steps > 0 else []}
    if model.has_s1:
        res["loss_s1"] = loss_s1
    return res


@torch.no_grad()
def best_of_n_loss(model: EBT, batches, steps: int, n: int, noise: float, *, seed: int = 0) -> float:
    """Self-verification: n noisy chains of `steps` steps from the same start; per position keep
    the chain whose final energy is lowest; mean CE of the kept candidates."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i, (x, y) in enumerate(batches):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)
        ctx = model.context(x)
        z0 = initial_logits(model, ctx, x.shape[1], generator=gen)
        finals, energies = [], []
        for _ in range(n):
            out = think(model, ctx, z0, steps, noise=noise, final_energy=True, generator=gen)
            finals.append(out.final)
            energies.append(out.final_energy)
        pick = torch.stack(energies).argmin(0)  # (B, T): lowest-energy chain per position
        z = torch.stack(finals).gather(0, pick[None, ..., None].expand(1, *finals[0].shape))[0]
        total += ce(z, y).item() / len(batches)
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
