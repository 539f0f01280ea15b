"""Thinking: refine candidate logits z by descending the energy, z <- base - alpha * dJ/d(.).

One step k (the paper's Sec. 3, with the reference code's options):
    z      <- z.detach()                                  if detach_refine
    z      <- z + think_noise * N(0, I)                   (training, or when asked)
    p       = softmax(z / tau)
    J       = sum_t E_t(x, p) - entropy_weight * sum_t H(p_t)
    g       = dJ/dp  (think_grad=probs|hybrid)  or  dJ/dz  (think_grad=logits)
    g       = g + think_prox_weight * (base - base_0)     pull toward the start z_0 (or p_0)
    g       = clamp(g, +-think_max_move / alpha)          if think_max_move > 0
    alpha*g <- alpha*g - (alpha*g . u / u . u) u          if think_neutral, u = base - mean_V(base)
    z_next  = p - alpha*g (probs) | z - alpha*g (logits, hybrid)

think_neutral asks whether a step carries re-ranking information beyond sharpening: moving the
logits along u = z - mean_V(z) only rescales them (softmax((1 + c) z) is z sharpened or
flattened, the ranking unchanged), so that part of each move is removed. The move is taken from
the step's base (z, or p with think_grad=probs, where the chain's next logits are p - alpha*g).

Positions never see each other's candidates, so the gradient of the *sum* of energies gives each
position exactly its own dE_t/dz_t. With create_graph=True the step is differentiable in the
model parameters: that second-order path is how the energy network learns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoebm.model import EBT, Context


@dataclass
class ThinkOut:
    z0: torch.Tensor                                 # (B, T, V) initial candidate logits
    logits: list = field(default_factory=list)       # z_1..z_K, each (B, T, V)
    energies: list = field(default_factory=list)     # E(z_0)..E(z_{K-1}), each (B, T)
    final_energy: torch.Tensor | None = None         # E(z_K) (B, T), when asked for

    @property
    def final(self) -> torch.Tensor:
        return self.logits[-1] if self.logits else self.z0


def initial_logits(model: EBT, ctx: Context, n_pos: int, mode: str | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z_0 for the last n_pos positions: S1 logits, N(0, think_init_std^2) noise or zeros."""
    cfg = model.cfg
    mode = mode or cfg.think_init
    B, dev = ctx.kv[0][0].shape[0], ctx.kv[0][0].device
    shape = (B, n_pos, cfg.vocab_size)
    if mode == "s1":
        return ctx.s1_logits[:, -n_pos:]
    if mode == "noise":
        return torch.randn(shape, device=dev, generator=generator) * cfg.think_init_std
    if mode == "zeros":
        return torch.zeros(shape, device=dev)
    raise ValueError(f"unknown think_init={mode!r}: use s1, noise or zeros")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) per position, written as a function of p itself so dH/dp is exact. (B, T)"""
    return -(p * p.clamp_min(1e-20).log()).sum(-1)


def without_sharpening(move: torch.Tensor, base: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """move (B, T, V) minus its component along u = base - mean_V(base), position by position:
    what is left cannot scale the logits. Where u = 0 (all logits equal) nothing is removed."""
    u = base - base.mean(-1, keepdim=True)  # (B, T, V)
    coef = (move * u).sum(-1, keepdim=True) / ((u * u).sum(-1, keepdim=True) + eps)  # (B, T, 1)
    return move - coef * u


def think(model: EBT, ctx: Context, z0: torch.Tensor, steps: int, *, create_graph: bool = False,
          noise: float | None = None, lr: float | None = None, random_scale: float = 1.0,
          accept_lower_energy: bool = False, final_energy: bool = False,
          generator: torch.Generator | None = None, on_step=None) -> ThinkOut:
    """Run `steps` think steps from z0 (B, T, V). create_graph=True when the result is trained
    on (then truncate_refine keeps the graph only on the last step). noise/lr override the
    model's think_noise / alpha (inference); random_scale s draws alpha per token.
    on_step(k, z_next) runs after each step: training backpropagates that step's loss there,
    before the next step is built (with detach_refine no later step reaches back into it)."""
    cfg = model.cfg
    tau, lam = cfg.softmax_temperature, cfg.entropy_weight
    noise = cfg.think_noise if noise is None else noise
    scale = 1.0
    if random_scale != 1.0:  # per-token alpha ~ U[alpha/s, alpha*s] (B, T, 1)
        u = torch.rand(z0.shape[:2] + (1,), device=z0.device, generator=generator)
        scale = 1 / random_scale + u * (random_scale - 1 / random_scale)
    out = ThinkOut(z0=z0)
    z = z0
    prox = cfg.think_prox_weight
    if prox:  # the anchor of the proximal pull; detached like the chain it anchors
        anchor = z0.detach() if cfg.detach_refine else z0
        anchor = torch.softmax(anchor / tau, -1) if cfg.think_grad == "probs" else anchor
    with torch.enable_grad():  # thinking needs dE/dz even inside no_grad evaluation
        for k in range(steps):
            graph = create_graph and (not cfg.truncate_refine or k == steps - 1)
            if cfg.detach_refine or not z.requires_grad:
                z = z.detach().requires_grad_(True)
            if noise > 0:
                z = z + noise * torch.randn(z.shape, device=z.device, generator=generator)
            p = torch.softmax(z / tau, dim=-1)  # (B, T, V)
            # a step nobody differentiates through again runs the fused (SDPA) attention
            E = model.energy(ctx, p, step=k, stopgrad_cand=cfg.mixture_stopgrad,
                             fused=not graph)  # (B, T)
            J = E.sum() - lam * entropy(p).sum() if lam else E.sum()
            wrt = z if cfg.think_grad == "logits" else p
            g, = torch.autograd.grad(J, wrt, create_graph=graph)  # (B, T, V)
            # alpha's graph is built per step: a step's early backward must not free it for the next
            alpha = model.alpha.clamp(min=1e-4) if lr is None else torch.tensor(float(lr), device=z0.device)
            alpha = alpha * scale
            base = p if cfg.think_grad == "probs" else z
            if prox:  # J + prox/2 |base - base_0|^2: repeated steps settle at a fixed point
                g = g + prox * (base - anchor)
            if cfg.think_max_move > 0:  # trust region: no logit moves more than max_move
                bound = cfg.think_max_move / alpha
                g = torch.maximum(torch.minimum(g, bound), -bound)
            move = alpha * g
            if cfg.think_neutral:  # applied last: the step stays orthogonal to u, clamped or not
                move = without_sharpening(move, base)
            z_next = base - move
            if accept_lower_energy:  # keep the step only where it lowers that position's E
                with torch.no_grad():
                    E_next = model.energy(ctx, torch.softmax(z_next / tau, -1), step=k, fused=True)
                z_next = torch.where((E_next < E).unsqueeze(-1), z_next, z)
            if not create_graph:  # inference: nothing downstream differentiates through this
                z_next = z_next.detach()
            out.energies.append(E if graph else E.detach())
            out.logits.append(z_next)
            if on_step is not None:
                on_step(k, z_next)
            z = z_next
        if final_energy:
            with torch.no_grad():
                out.final_energy = model.energy(ctx, torch.softmax(z / tau, -1), step=steps, fused=True)
    return out
