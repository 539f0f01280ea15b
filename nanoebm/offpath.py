"""Training the energy off the descent path: where thinking starts, and what else E must rank.

CE-through-K training (nanoebm/losses.py) only asks each step, taken from the System-1 start,
to lower the CE. The learned step then becomes a context-dependent sharpening push, which helps
on training text and hurts off it. The options here change *what the energy is trained on*;
all are training-time only and off by default.

Where the think path starts (start_for_training):
    think_start_scale / think_start_noise   two-sided perturbed starts: z_0 = s * z_S1 + sigma * eps,
        s ~ logUniform[1/s_max, s_max], sigma ~ U[0, sigma_max] per position, z_S1 detached. Starts
        both sharper and flatter than S1 make "always sharpen" a losing move.
    think_mixed_starts f                    a fraction f of the rows starts from noise (the
        reference's System-2 start), the rest from S1: one landscape for both.
    think_free_steps n_max                  n ~ U{0..n_max} steps without a graph before the trained
        steps (progressive random depth): no step learns a step-specific move.

What the energy must also rank (extra_terms), on candidates the chain never visits:
    value_align_weight   listwise: softmax(-E/tau) over M candidates per position (S1 at
        temperatures 1, 0.5, 0.7, 1.4, 2 and the final z_K) should match softmax(-CE/tau).
    residual_nce_weight  s_v = log p_S1(v) - E(x, onehot v) over the top-k S1 tokens and the
        target, trained with CE toward the target: E corrects S1 exactly on its confusion set.

Cross-fitting (crossfit_masks): every crossfit_every-th chunk of crossfit_chunk training tokens is
split B. The S1 CE sees only split-A targets, the think loss only split-B targets (from a detached
start), so the refiner learns S1's out-of-sample errors, as in stacking.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from nanoebm.model import EBT, Context, at_least_f32
from nanoebm.think import think

VALUE_TEMPERATURES = (0.5, 0.7, 1.4, 2.0)  # S1 / T: the off-path candidates of value alignment


# ---------------------------------------------------------------------- where thinking starts
def perturb_start(z: torch.Tensor, scale_max: float, noise_max: float) -> torch.Tensor:
    """s * z + sigma * eps per position, s ~ logUniform[1/scale_max, scale_max], sigma ~
    U[0, noise_max]; z (B, T, V) is detached (the think path never trains the S1 head)."""
    B, T, _ = z.shape
    log_s = (2 * torch.rand(B, T, 1, device=z.device) - 1) * math.log(scale_max)  # (B, T, 1)
    sigma = noise_max * torch.rand(B, T, 1, device=z.device)  # (B, T, 1)
    return log_s.exp() * z.detach() + sigma * torch.randn_like(z)


def mixed_starts(model: EBT, z: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first round(fraction * B) rows of z (B, T, V) restart from N(0, think_init_std^2)."""
    n = round(fraction * z.shape[0])
    noise = torch.randn_like(z[:n]) * model.cfg.think_init_std  # (n, T, V)
    return torch.cat([noise, z[n:]], dim=0)


def free_steps(model: EBT, ctx: Context, z: torch.Tensor, n: int) -> torch.Tensor:
    """n think steps that nothing is trained through: no graph, the result detached."""
    cfg = model.cfg
    kv = Context(kv=[(k.detach(), v.detach()) for k, v in ctx.kv], s1_logits=None)
    out = think(model, kv, z.detach(), n, create_graph=False, random_scale=cfg.think_lr_random_scale)
    return out.final.detach()


def start_for_training(model: EBT, ctx: Context, z0: torch.Tensor) -> torch.Tensor:
    """z_0 of the trained think path: the options above, applied in this order."""
    cfg = model.cfg
    if not model.training:
        return z0
    if cfg.think_start_scale > 1 or cfg.think_start_noise > 0:
        z0 = perturb_start(z0, cfg.think_start_scale, cfg.think_start_noise)
    if cfg.think_mixed_starts > 0:
        z0 = mixed_starts(model, z0, cfg.think_mixed_starts)
    if cfg.think_free_steps > 0:
        n = random.randint(0, cfg.think_free_steps)  # once per batch, like think_steps_random
        z0 = free_steps(model, ctx, z0, n) if n else z0
    return z0


# ------------------------------------------------------------- what the energy must also rank
def value_align_term(model: EBT, ctx: Context, y: torch.Tensor, z_final: torch.Tensor,
                     step: int) -> torch.Tensor:
    """CE(softmax(-E/tau), softmax(-c/tau)) over the M candidates of each position, averaged
    over positions; c_i is candidate i's CE against y (B, T). Candidates are detached: only E
    learns."""
    tau, s1 = model.cfg.value_align_tau, ctx.s1_logits.detach()
    cands = [s1] + [s1 / T for T in VALUE_TEMPERATURES] + [z_final.detach()]  # M x (B, T, V)
    st = model.cfg.softmax_temperature
    E = torch.stack([model.energy(ctx, torch.softmax(z / st, -1), step=step, fused=True)
                     for z in cands], -1)  # (B, T, M)
    c = torch.stack([F.cross_entropy(at_least_f32(z).transpose(1, 2), y, reduction="none")
                     for z in cands], -1)  # (B, T, M)
    target = torch.softmax(-c / tau, -1)  # (B, T, M): lower CE, more mass
    return -(target * torch.log_softmax(-E / tau, -1)).sum(-1).mean()


def nce_candidates(s1: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, k+1) token ids: the k most likely S1 tokens other than the target, then the target."""
    others = s1.scatter(-1, y.unsqueeze(-1), float("-inf"))  # (B, T, V): the target ruled out
    return torch.cat([others.topk(k, -1).indices, y.unsqueeze(-1)], -1)  # (B, T, k+1)


def residual_nce_term(model: EBT, ctx: Context, y: torch.Tensor, step: int) -> torch.Tensor:
    """CE of s_v = log p_S1(v) - E(x, onehot v) over nce_candidates toward the target (the
    last index). log p_S1 is detached: the base model stays S1's CE's to train."""
    s1 = at_least_f32(ctx.s1_logits.detach())
    tokens = nce_candidates(s1, y, model.cfg.residual_nce_topk)  # (B, T, k+1)
    E = torch.stack([model.energy_of_tokens(ctx, tokens[..., j], step=step)
                     for j in range(tokens.shape[-1])], -1)  # (B, T, k+1)
    s = torch.log_softmax(s1, -1).gather(-1, tokens) - E  # (B, T, k+1)
    target = torch.full_like(y, tokens.shape[-1] - 1)  # (B, T): the target sits last
    return F.cross_entropy(s.flatten(0, 1), target.flatten())


def extra_terms(model: EBT, ctx: Context, y: torch.Tensor, z_final: torch.Tensor, K: int):
    """The weighted ranking terms that are switched on, and their detached values for the log."""
    cfg, total, m = model.cfg, 0.0, {}
    if not model.training:
        return total, m
    step = K  # the landscape the final candidate is judged on (ThinkOut.final_energy's)
    if cfg.value_align_weight > 0:
        t = value_align_term(model, ctx, y, z_final, step)
        total, m["value_align"] = total + cfg.value_align_weight * t, t.detach()
    if cfg.residual_nce_weight > 0:
        t = residual_nce_term(model, ctx, y, step)
        total, m["residual_nce"] = total + cfg.residual_nce_weight * t, t.detach()
    return total, m


# ------------------------------------------------------------------------------ cross-fitting
def split_b_mask(starts: torch.Tensor, T: int, every: int, chunk: int) -> torch.Tensor:
    """(B, T) bool: whether the target of position t of the window starting at `starts` (B,),
    i.e. token starts + t + 1, lies in split B (every `every`-th chunk of `chunk` tokens)."""
    target_index = starts.view(-1, 1) + 1 + torch.arange(T)  # (B, T)
    return (target_index // chunk) % every == every - 1


def masked_mean(c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of c (N,) over mask (N,) (all of c when mask is None; 0 when the mask is empty)."""
    if mask is None:
        return c.mean()
    return (c * mask).sum() / mask.sum().clamp_min(1)
