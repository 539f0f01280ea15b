"""Training objective: CE of the candidate after each think step, plus optional energy shaping.

    loss = mean_k CE(z_{k+1}, x_{t+1})      (or the last step only with truncate_refine)
         + aux_ce_weight * CE(S1 logits)    (when the model has an S1 head)
         + contrastive_weight * L_cd        (use_contrastive, training only)

With think_steps=0 only the S1 term is left: a plain causal LM, the baseline.

The contrastive terms, persistent chains and the replay buffer live in nanoebm/shaping.py.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from nanoebm.model import EBT, Context, at_least_f32
from nanoebm.shaping import EnergyShaping, energy_margin
from nanoebm.think import initial_logits, think


def ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32."""
    return F.cross_entropy(at_least_f32(logits).flatten(0, 1), y.flatten(), reduction=reduction)


def step_weights(K: int, how: str) -> list[float]:
    """Weights of the K per-step CEs: mean (SPEC default), last only, or linear 1..K."""
    if how == "last":
        return [0.0] * (K - 1) + [1.0]
    w = list(range(1, K + 1)) if how == "linear" else [1] * K
    return [wk / sum(w) for wk in w]


def train_think_steps(model: EBT) -> int:
    """K for this batch: think_steps, or K..K+r drawn once per batch (think_steps_random=r)."""
    cfg = model.cfg
    if model.training and cfg.think_steps_random > 0:
        return cfg.think_steps + random.randint(0, cfg.think_steps_random)
    return cfg.think_steps + cfg.think_steps_random


# ------------------------------------------------------------------------------- the loss
def ebt_loss(model: EBT, x: torch.Tensor, y: torch.Tensor, *, want_metrics: bool = False,
             shaping: EnergyShaping | None = None, backward_scale: float | None = None):
    """One training forward: context stream once, K think steps, CE per step (+ contrastive).
    Returns (loss, metrics); metrics are detached device tensors (no host syncs here).

    backward_scale=s also backpropagates s * loss and returns it detached. With detach_refine
    (no step reaches back into an earlier one) each step's loss is backpropagated as soon as
    the step is built, so only one step's second-order graph is alive at a time; the gradients
    arriving at the shared keys/values collect on leaf copies and go through the context stream
    in one pass at the end. Same loss and gradients as loss.backward(), less memory."""
    cfg, training = model.cfg, model.training
    if shaping is None and (cfg.use_contrastive or cfg.replay_buffer_size > 0):
        raise ValueError("model.use_contrastive / model.replay_buffer_size keep state between "
                         "steps: pass shaping=EnergyShaping(model.cfg, model) to ebt_loss")
    contrastive = cfg.use_contrastive and training  # a training-time regulariser only
    neg = None
    if contrastive and shaping.kind != "cd":  # first: fast weights are swapped in place
        neg = shaping.persistent_negatives(model, x)
    replay = shaping.replay if shaping is not None and training else None
    B, z_replay = x.shape[0], None
    if replay is not None and (idx := replay.sample(B)) is not None:
        x, y = torch.cat([x, replay.x[idx]]), torch.cat([y, replay.y[idx]])  # (B + m, T)
        z_replay = replay.z[idx]  # (m, T, V) where thinking stopped on these windows
    ctx = model.context(x)  # the only context-stream pass of this batch
    K = train_think_steps(model)
    m = {}
    loss_s1 = ce(ctx.s1_logits, y) if model.has_s1 else None
    stepwise = (backward_scale is not None and training and K > 0 and cfg.detach_refine
                and not contrastive and replay is None and torch.is_grad_enabled())
    if K == 0:
        loss = loss_s1
        m["ce_s1"] = loss_s1.detach()
        z_pred = ctx.s1_logits
    else:
        z0 = initial_logits(model, ctx, x.shape[1])
        if z_replay is not None:  # replay rows restart from their stored final candidate
            z0 = torch.cat([z0[:B], z_replay])
        ctx_graph = ctx
        if stepwise:  # think on leaf copies of the keys/values; their .grad collects the steps'
            ctx = Context(kv=[(k.detach().requires_grad_(), v.detach().requires_grad_())
                              for k, v in ctx.kv], s1_logits=ctx.s1_logits)
        w = step_weights(K, "last" if cfg.truncate_refine else cfg.think_loss)
        prev = [ce(z0, y, reduction="none").detach()]  # per-token CE before each step
        ces, parts = [], []

        def step_loss(k: int, z_next: torch.Tensor) -> None:
            c = ce(z_next, y, reduction="none")  # (B*T,) CE after step k+1
            part = w[k] * c.mean()
            if cfg.think_improve_weight > 0:  # penalise any token this step makes worse
                part = part + cfg.think_improve_weight / K * (c - prev[-1]).relu().mean()
            prev.append(c.detach())
            ces.append(c.detach().mean())
            if stepwise and part.requires_grad:  # free this step's graph now
                (part * backward_scale).backward()
                part = part.detach()
            parts.append(part)

        scale = cfg.think_lr_random_scale if training else 1.0
        out = think(model, ctx, z0, K, create_graph=training, random_scale=scale,
                    noise=None if training else 0.0, final_energy=want_metrics, on_step=step_loss)
        loss = sum(parts)
        if loss_s1 is not None and cfg.aux_ce_weight > 0:
            loss = loss + cfg.aux_ce_weight * loss_s1
        if stepwise:  # one backward through the context stream: S1 CE + the collected kv grads
            roots = [(t, leaf.grad) for kv, kv_leaf in zip(ctx_graph.kv, ctx.kv)
                     for t, leaf in zip(kv, kv_leaf) if leaf.grad is not None]
            if loss.requires_grad:  # the S1 term
                roots.append((loss * backward_scale, None))
            if roots:
                torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
            loss = loss.detach()
        if replay is not None:  # only fresh rows become records
            replay.push(x[:B], y[:B], out.final[:B])
        z_pred = out.final
        if want_metrics:
            m["ce_k0"] = prev[0].mean()
            for k, c in enumerate(ces):
                m[f"ce_k{k + 1}"] = c
            if loss_s1 is not None:
                m["ce_s1"] = loss_s1.detach()
            m["energy_before"] = out.energies[0].detach().mean()
            m["energy_after"] = out.final_energy.mean()
        m["ce_think"] = ces[-1]
    parts = None
    if contrastive:
        l_cd, parts = shaping.contrastive(model, ctx, y, z_pred.detach(), neg)
        loss = loss + cfg.contrastive_weight * l_cd
        m["cd_loss"] = l_cd.detach()
    if want_metrics and (contrastive or K > 0):
        m.update(_shaping_metrics(model, ctx, y, z_pred.detach(), parts, shaping))
    if backward_scale is not None and not stepwise:
        (loss * backward_scale).backward()
        loss = loss.detach()
    return loss, m


def _shaping_metrics(model, ctx, y, z_pred, parts, shaping) -> dict:
    """Energy margin (always on the batch's own positions; for pcd the negatives come from a
    diagnostic CD chain with a private generator, so logging never moves the training RNG)."""
    E_neg = parts["E_neg_t"].detach() if parts is not None and parts["aligned"] else None
    gen = torch.Generator(device=y.device).manual_seed(0)
    mm = energy_margin(model, ctx, y, z_pred, E_neg, generator=gen)
    m = {"energy_margin": mm["energy_margin"]}
    if parts is not None:  # the contrastive phases as trained
        m["E_pos"], m["E_neg"] = parts["E_pos_t"].detach().mean(), parts["E_neg_t"].detach().mean()
    if shaping is not None and shaping.n_rec:
        m["buffer_fill"] = torch.tensor(float(shaping.used.float().mean()))
        m["restarts"] = torch.tensor(float(shaping.restarts))
    if shaping is not None and shaping.replay is not None:
        m["replay_fill"] = torch.tensor(shaping.replay.n / shaping.replay.size)
    return m
