"""The training objective: cross-entropy of the candidate after each think step, plus the S1 CE.

    loss = sum_k w_k * CE(z_k, x_{t+1})  +  aux_ce_weight * CE(S1 logits, x_{t+1})

over the K think steps z_1..z_K (the paper's Sec. 3: the energy is learned by backpropagating
through the descent, which is second order). w_k is 1/K each, or only the last step with
truncate_refine. With think_steps=0 only the S1 term is left: the plain transformer LM, the
baseline.

    ebt_loss           the formula as written; call loss.backward() on its result
    ebt_loss_stepwise  the same loss and gradients with the backward done step by step, so memory
                       stays flat in K (tests/test_fast_step.py holds the two equal)
    forward_backward   what a training step runs: the stepwise version where it applies
    thinking_curve     held out: the mean CE after k = 0..N think steps on fixed batches, paired
                       (every k from the same start and noise; one chain of N steps gives every k)

Contrastive energy shaping and the replay buffer (nanoebm/shaping.py) attach to ebt_loss through
one hook, an EnergyShaping object, called at the three places marked "hook".
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanoebm.model import EBT, Context, at_least_f32
from nanoebm.shaping import EnergyShaping, energy_metrics
from nanoebm.think import initial_logits, think


def ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32."""
    return F.cross_entropy(at_least_f32(logits).flatten(0, 1), y.flatten(), reduction=reduction)


def step_weights(K: int, last_only: bool) -> list[float]:
    """Weights w_1..w_K of the per-step CEs: 1/K each (the paper's), or the last step only."""
    return [0.0] * (K - 1) + [1.0] if last_only else [1.0 / K] * K


def train_think_steps(model: EBT) -> int:
    """K for this batch: think_steps, or K..K+r drawn once per batch (think_steps_random=r)."""
    cfg = model.cfg
    if model.training and cfg.think_steps_random > 0:
        return cfg.think_steps + random.randint(0, cfg.think_steps_random)
    return cfg.eval_think_steps


def s1_loss(ctx: Context, y: torch.Tensor):
    """The S1 CE over every target, or None when the model has no S1 head."""
    return None if ctx.s1_logits is None else ce(ctx.s1_logits, y)


def think_for_loss(model: EBT, ctx: Context, z0: torch.Tensor, K: int, want_metrics: bool,
                   on_step=None):
    """The K training think steps: differentiable in training (create_graph), with alpha drawn
    per token and noise; plain descent in evaluation."""
    training = model.training
    return think(model, ctx, z0, K, create_graph=training, noise=None if training else 0.0,
                 random_scale=model.cfg.think_lr_random_scale if training else 1.0,
                 final_energy=want_metrics, on_step=on_step)


def think_metrics(ces: list, out, loss_s1, want_metrics: bool) -> dict:
    """Detached device tensors (no host sync): CE before and after each step, S1 CE, energies."""
    m = {}
    if want_metrics:
        m.update({f"ce_k{k}": c.detach().mean() for k, c in enumerate(ces)})
        if loss_s1 is not None:
            m["ce_s1"] = loss_s1.detach()
        m["energy_before"] = out.energies[0].detach().mean()
        m["energy_after"] = out.final_energy.mean()
    m["ce_think"] = ces[-1].detach().mean()
    return m


# ------------------------------------------------------------------------------- the loss
def ebt_loss(model: EBT, x: torch.Tensor, y: torch.Tensor, *, want_metrics: bool = False,
             shaping: EnergyShaping | None = None):
    """One forward: the context stream once, K think steps, the loss above (+ energy shaping).
    Returns (loss, metrics); metrics are detached device tensors."""
    cfg, K = model.cfg, train_think_steps(model)
    if shaping is None and (cfg.use_contrastive or cfg.replay_buffer_size > 0):
        raise ValueError("model.use_contrastive / model.replay_buffer_size keep state between "
                         "steps: pass shaping=EnergyShaping(model.cfg, model) to ebt_loss")
    hook = shaping if model.training else None  # shaping is a training-time regulariser only
    if hook is not None:  # hook: replay rows join the batch, persistent negative chains advance
        x, y = hook.before_forward(model, x, y)
    ctx = model.context(x)  # the only context-stream pass of this batch
    loss_s1 = s1_loss(ctx, y)
    if K == 0:  # the plain transformer: next-token CE of the S1 head
        loss, z_final, m = loss_s1, ctx.s1_logits, {"ce_s1": loss_s1.detach()}
    else:
        z0 = initial_logits(model, ctx, x.shape[1])  # (B, T, V)
        if hook is not None:  # hook: replay rows restart from where thinking left them
            z0 = hook.restart(z0)
        out = think_for_loss(model, ctx, z0, K, want_metrics)
        ces = [ce(z, y, reduction="none") for z in [z0] + out.logits]  # (B*T,) at z_0..z_K
        w = step_weights(K, cfg.truncate_refine)
        loss = sum(w[k] * ces[k + 1].mean() for k in range(K))
        if loss_s1 is not None and cfg.aux_ce_weight > 0:
            loss = loss + cfg.aux_ce_weight * loss_s1
        z_final, m = out.final, think_metrics(ces, out, loss_s1, want_metrics)
    parts = None
    if hook is not None:  # hook: the contrastive term; this batch's candidates join the replay
        loss, parts = hook.after_thinking(model, ctx, x, y, z_final, loss, m)
    if want_metrics and (K > 0 or parts is not None):
        m.update(energy_metrics(model, ctx, y, z_final.detach(), parts, shaping))
    return loss, m


# ------------------------------------------------- the same, with less memory
def ebt_loss_stepwise(model: EBT, x: torch.Tensor, y: torch.Tensor, *, backward_scale: float,
                      want_metrics: bool = False, shaping: EnergyShaping | None = None):
    """ebt_loss followed by (backward_scale * loss).backward(), for detach_refine=true training
    without shaping terms. Returns the detached loss and the metrics.

    With detach_refine no step reaches back into an earlier one, so each step's loss can be
    backpropagated as soon as the step is built, and only one step's second-order graph is
    alive at a time. The steps' gradients arriving at the shared keys/values collect on leaf
    copies of them and go through the context stream once, at the end, with the S1 CE."""
    cfg, K = model.cfg, train_think_steps(model)
    if not cfg.detach_refine or cfg.use_contrastive or cfg.replay_buffer_size > 0:
        raise ValueError("ebt_loss_stepwise needs model.detach_refine=true and no contrastive "
                         "term or replay: use forward_backward, which picks the right loss")
    ctx = model.context(x)
    loss_s1 = s1_loss(ctx, y)
    if K == 0:
        (loss_s1 * backward_scale).backward()
        return loss_s1.detach(), {"ce_s1": loss_s1.detach()}
    leaf = Context(kv=[(k.detach().requires_grad_(), v.detach().requires_grad_())
                       for k, v in ctx.kv], s1_logits=ctx.s1_logits)
    z0 = initial_logits(model, leaf, x.shape[1])
    w = step_weights(K, cfg.truncate_refine)
    ces, terms = [ce(z0, y, reduction="none").detach()], []

    def backward_now(k: int, z_next: torch.Tensor) -> None:  # think() calls this after step k
        c = ce(z_next, y, reduction="none")
        term = w[k] * c.mean()
        ces.append(c.detach())
        if term.requires_grad:  # free this step's graph now; its key/value grads stay on `leaf`
            (term * backward_scale).backward()
        terms.append(term.detach())

    out = think_for_loss(model, leaf, z0, K, want_metrics, on_step=backward_now)
    loss = sum(terms)
    if loss_s1 is not None and cfg.aux_ce_weight > 0:
        loss = loss + cfg.aux_ce_weight * loss_s1
    # one backward through the context stream: the S1 CE and the collected key/value gradients
    roots = [(t, t_leaf.grad) for kv, kv_leaf in zip(ctx.kv, leaf.kv)
             for t, t_leaf in zip(kv, kv_leaf) if t_leaf.grad is not None]
    if loss.requires_grad:
        roots.append((loss * backward_scale, None))
    if roots:
        torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
    m = think_metrics(ces, out, loss_s1, want_metrics)
    if want_metrics:
        m.update(energy_metrics(model, leaf, y, out.final.detach(), None, shaping))
    return loss.detach(), m


def forward_backward(model: EBT, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0,
                     want_metrics: bool = False, shaping: EnergyShaping | None = None):
    """One training micro-batch: loss and the backward of scale * loss. Returns the detached
    loss and the metrics. Uses ebt_loss_stepwise where it computes the same thing (detached
    think steps, no contrastive term, no replay), ebt_loss + backward otherwise."""
    cfg = model.cfg
    if (model.training and cfg.detach_refine and torch.is_grad_enabled()
            and not cfg.use_contrastive and cfg.replay_buffer_size == 0):
        return ebt_loss_stepwise(model, x, y, backward_scale=scale, want_metrics=want_metrics,
                                 shaping=shaping)
    loss, m = ebt_loss(model, x, y, want_metrics=want_metrics, shaping=shaping)
    (loss * scale).backward()
    return loss.detach(), m


# ------------------------------------------------- held-out: the loss after k think steps
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
