"""Training objective: CE of the candidate after each think step (+ aux CE on System 1).

    loss = mean_k CE(z_{k+1}, x_{t+1})      (or the last step only with truncate_refine)
         + aux_ce_weight * CE(S1 logits)    (when the model has an S1 head)

With think_steps=0 only the S1 term is left: a plain causal LM, the baseline.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from nanoebm.model import EBT, at_least_f32
from nanoebm.think import initial_logits, think


def ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32."""
    return F.cross_entropy(at_least_f32(logits).flatten(0, 1), y.flatten(), reduction=reduction)


def step_weighted(ces: list, how: str) -> torch.Tensor:
    """Combine the per-step CEs: mean (SPEC default), last only, or linear weights 1..K."""
    if how == "last":
        return ces[-1]
    w = torch.arange(1, len(ces) + 1, dtype=torch.float32) if how == "linear" else torch.ones(len(ces))
    w = (w / w.sum()).tolist()
    return sum(wk * c for wk, c in zip(w, ces))


def train_think_steps(model: EBT) -> int:
    """K for this batch: think_steps, or K..K+r drawn once per batch (think_steps_random=r)."""
    cfg = model.cfg
    if model.training and cfg.think_steps_random > 0:
        return cfg.think_steps + random.randint(0, cfg.think_steps_random)
    return cfg.think_steps + cfg.think_steps_random


def ebt_loss(model: EBT, x: torch.Tensor, y: torch.Tensor, *, want_metrics: bool = False):
    """One training forward: context stream once, K think steps, CE per step.
    Returns (loss, metrics); metrics are detached device tensors (no host syncs here)."""
    cfg = model.cfg
    ctx = model.context(x)  # the only context-stream pass of this batch
    K = train_think_steps(model)
    m = {}
    loss_s1 = ce(ctx.s1_logits, y) if model.has_s1 else None
    if K == 0:
        m["ce_s1"] = loss_s1.detach()
        return loss_s1, m
    z0 = initial_logits(model, ctx, x.shape[1])
    scale = cfg.think_lr_random_scale if model.training else 1.0
    out = think(model, ctx, z0, K, create_graph=model.training, random_scale=scale,
                final_energy=want_metrics)
    tok_ces = [ce(z, y, reduction="none") for z in out.logits]  # per-token CE after each step
    ces = [c.mean() for c in tok_ces]
    loss = step_weighted(ces, "last" if cfg.truncate_refine else cfg.think_loss)
    if cfg.think_improve_weight > 0:  # penalise any token a step makes worse than its start
        prev = [ce(z0, y, reduction="none")] + tok_ces[:-1]
        hurt = torch.stack([(c - p.detach()).relu().mean() for c, p in zip(tok_ces, prev)]).mean()
        loss = loss + cfg.think_improve_weight * hurt
    if loss_s1 is not None and cfg.aux_ce_weight > 0:
        loss = loss + cfg.aux_ce_weight * loss_s1
    if cfg.use_contrastive:
        raise NotImplementedError("model.use_contrastive: contrastive losses are not built yet")
    if want_metrics:
        m["ce_k0"] = ce(z0, y).detach()
        for k, c in enumerate(ces):
            m[f"ce_k{k + 1}"] = c.detach()
        if loss_s1 is not None:
            m["ce_s1"] = loss_s1.detach()
        m["energy_before"] = out.energies[0].detach().mean()
        m["energy_after"] = out.final_energy.mean()
    m["ce_think"] = ces[-1].detach()
    return loss, m
