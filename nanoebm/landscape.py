"""Energy-landscape computations for viz.py: every number here is the model's real energy.

Pictures of an EBT are only worth something if they show E(x, p) itself, so nothing in this file
draws: it runs the think loop (nanoebm.think.think) and evaluates model.energy on slices of
candidate space. A slice is evaluated as a *batch of candidates*: G grid points become G rows of
one forward pass that share the prompt's context keys/values, so a 41 x 41 surface costs a few
forwards, not 1,681. Plotting lives in nanoebm/plots.py.

Coordinates. Softmax ignores a constant shift of the logits, so a candidate z is shown in
normalised coordinates zn = z - tau * logsumexp(z / tau), i.e. zn / tau = log p. Think steps with
think_grad=probs|hybrid leave z on a different scale than the S1 logits; zn makes them comparable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoebm.losses import ce
from nanoebm.model import EBT, Context
from nanoebm.think import initial_logits, think

MAX_CAND_FLOATS = 2 ** 22  # rows per forward x vocab: bounds the dense (rows, V) candidate tensor


def expand_ctx(ctx: Context, n: int) -> Context:
    """A one-row context seen as n rows (a view, no copy): n candidates share one prompt."""
    kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in ctx.kv]  # (n, H, T, hd)
    s1 = None if ctx.s1_logits is None else ctx.s1_logits.expand(n, -1, -1)
    return Context(kv=kv, s1_logits=s1)


def normalise(z: torch.Tensor, tau: float) -> torch.Tensor:
    """zn = z - tau*logsumexp(z/tau): same softmax, and zn/tau is the log-probability. (..., V)"""
    return z - tau * torch.logsumexp(z / tau, dim=-1, keepdim=True)


@torch.no_grad()
def energies_of_probs(model: EBT, ctx: Context, P: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Energies (N,) of N candidate distributions P (N, V) for the next token after a one-row
    context (the last position). Rows are batched, chunked to keep (rows, V) small."""
    chunk = max(1, MAX_CAND_FLOATS // P.shape[-1])
    out = []
    for i in range(0, P.shape[0], chunk):
        p = P[i:i + chunk].unsqueeze(1)  # (n, 1, V): Tc = 1, the position after the prompt
        out.append(model.energy(expand_ctx(ctx, p.shape[0]), p, step=step)[:, 0])
    return torch.cat(out)


def energies_of_logits(model: EBT, ctx: Context, Z: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Energies (N,) of candidates given as logits Z (N, V): p = softmax(Z / tau)."""
    return energies_of_probs(model, ctx, torch.softmax(Z / model.cfg.softmax_temperature, -1), step)


@dataclass
class Trajectory:
    """A think chain for the next token after a prompt (n chains in parallel)."""
    z: torch.Tensor        # (K+1, n, V) candidate logits z_0..z_K
    energy: torch.Tensor   # (K+1, n) E(z_0)..E(z_K), exactly the think loop's numbers


@torch.no_grad()
def prompt_trajectory(model: EBT, ctx: Context, steps: int, n: int = 1, noise: float = 0.0,
                      generator: torch.Generator | None = None) -> Trajectory:
    """Think `steps` steps on the last position of a one-row context, n chains at once (they
    differ only through think_init=noise or Langevin `noise`)."""
    ctx_n = expand_ctx(ctx, n)
    z0 = initial_logits(model, ctx_n, 1, generator=generator)  # (n, 1, V)
    out = think(model, ctx_n, z0, steps, noise=noise, final_energy=True, generator=generator)
    z = torch.stack([z0] + out.logits)[:, :, 0]  # (K+1, n, V)
    energy = torch.stack(out.energies + [out.final_energy])[:, :, 0]  # (K+1, n)
    return Trajectory(z=z.float(), energy=energy.float())


def odd_grid(span: float, n: int) -> torch.Tensor:
    """n (made odd) evenly spaced points on [-span, span]; the middle one is exactly 0."""
    n = n + 1 - n % 2
    return torch.linspace(-span, span, n)


@torch.no_grad()
def bowl_profiles(model: EBT, ctx: Context, traj: Trajectory, span: float, grid: int) -> dict:
    """For each step k, E along the line through z_k in the direction of that step's update
    d_k = z_{k+1} - z_k (the last point reuses d_{K-1}): E(z_k + s * d_k/|d_k|), s in logits.
    s = 0 is the current candidate, s = |d_k| the next one. Chain 0 of `traj`."""
    z = traj.z[:, 0]  # (K+1, V)
    K = z.shape[0] - 1
    d = z[1:] - z[:-1]  # (K, V) the actual think updates
    d = torch.cat([d, d[-1:]])  # (K+1, V)
    norm = d.norm(dim=-1, keepdim=True)  # (K+1, 1)
    u = d / norm.clamp_min(1e-12)  # unit directions (a zero step keeps a zero direction)
    half = max(span, 1.25 * norm.max().item())  # always show where the step lands
    s = odd_grid(half, grid).to(z.device)  # (G,)
    curves = []
    for k in range(K + 1):
        line = z[k] + s[:, None] * u[k]  # (G, V) candidates on the line
        curves.append(energies_of_logits(model, ctx, line, step=k))
    return {"s": s.cpu(), "energy": torch.stack(curves).cpu(),  # (K+1, G)
            "step_len": norm[:, 0].cpu(), "point_energy": traj.energy[:, 0].cpu()}


def contested_tokens(traj: Trajectory, tau: float, n: int) -> torch.Tensor:
    """The n tokens with the highest probability at any step of chain 0 (the ones thinking is
    deciding between), most probable first."""
    p = torch.softmax(traj.z[:, 0] / tau, -1)  # (K+1, V)
    return p.max(0).values.topk(min(n, p.shape[-1])).indices


@torch.no_grad()
def plane_slice(model: EBT, ctx: Context, z_ref: torch.Tensor, i: int, j: int, a: torch.Tensor,
                b: torch.Tensor, step: int) -> torch.Tensor:
    """E over the plane through normalised z_ref where only logits i, j vary: zn[i]=a, zn[j]=b.
    Returns (len(b), len(a)) energies (rows = b, for contour plots)."""
    A, Bg = torch.meshgrid(a, b, indexing="xy")  # (Gb, Ga) each
    Z = normalise(z_ref, model.cfg.softmax_temperature).expand(A.numel(), -1).clone()  # (G*G, V)
    Z[:, i], Z[:, j] = A.reshape(-1), Bg.reshape(-1)
    return energies_of_logits(model, ctx, Z, step=step).view(A.shape)


@torch.no_grad()
def surface(model: EBT, ctx: Context, traj: Trajectory, span: float, grid: int,
            through: str = "start") -> dict:
    """The 2-D slice spanned by the two most contested tokens' logit directions.
    through="start": one slice through z_0 (the landscape thinking starts on); the path's
    projection is drawn at the slice's height there, and its real energies E(z_k) alongside.
    through="each": one slice per step through z_k, so the current point lies on it exactly."""
    tau = model.cfg.softmax_temperature
    i, j = contested_tokens(traj, tau, 2).tolist()
    zn = normalise(traj.z[:, 0], tau)  # (K+1, V)
    pa, pb = zn[:, i], zn[:, j]  # (K+1,) path coordinates, tau*log p of tokens i, j
    pad = max(span / 2, 0.15 * max((pa.max() - pa.min()).item(), (pb.max() - pb.min()).item()))
    a = torch.linspace(pa.min().item() - pad, pa.max().item() + pad, grid, device=zn.device)
    b = torch.linspace(pb.min().item() - pad, pb.max().item() + pad, grid, device=zn.device)
    refs = range(zn.shape[0]) if through == "each" else [0]
    slices = torch.stack([plane_slice(model, ctx, zn[r], i, j, a, b, step=r) for r in refs])
    # the path drawn on the (first) slice: E at the projected points, same plane as slices[0]
    on_plane = zn[0].expand(zn.shape[0], -1).clone()  # (K+1, V)
    on_plane[:, i], on_plane[:, j] = pa, pb
    path_on_slice = energies_of_logits(model, ctx, on_plane, step=0)
    return {"tokens": (i, j), "a": a.cpu(), "b": b.cpu(), "energy": slices.cpu(),  # (S, Gb, Ga)
            "path_a": pa.cpu(), "path_b": pb.cpu(), "path_energy": traj.energy[:, 0].cpu(),
            "path_on_slice": path_on_slice.cpu()}


@torch.no_grad()
def onehot_energies(model: EBT, ctx: Context, ids: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Energy (N,) of each token in ids (N,) as a one-hot candidate after a one-row context."""
    return energies_of_probs(model, ctx, F.one_hot(ids, model.cfg.vocab_size).float(), step)


@torch.no_grad()
def batch_gap(model: EBT, x: torch.Tensor, y: torch.Tensor, steps: int,
              generator: torch.Generator | None = None) -> dict:
    """Think on every position of a batch: mean energy E(z_k) and CE(z_k) for k = 0..K.
    The energies are the think loop's own (out.energies + out.final_energy)."""
    ctx = model.context(x)
    z0 = initial_logits(model, ctx, x.shape[1], generator=generator)  # (B, T, V)
    out = think(model, ctx, z0, steps, noise=0.0, final_energy=True, generator=generator)
    es = out.energies + [out.final_energy]  # K+1 x (B, T)
    return {"energy": torch.stack([e.float().mean() for e in es]).cpu(),
            "ce": torch.tensor([ce(z, y).item() for z in [z0] + out.logits]),
            "ctx": ctx, "final": out.final, "final_energy": out.final_energy}


@torch.no_grad()
def margins(model: EBT, x: torch.Tensor, y: torch.Tensor, steps: int, max_tokens: int = 256,
            generator: torch.Generator | None = None, seed: int = 0) -> dict:
    """Per val position: E(true one-hot) - E(final think candidate), and where the true token
    ranks among one-hot candidates (all tokens when V <= max_tokens, else the true token plus
    max_tokens - 1 random others). One-hots are judged at step index `steps`, like E(z_K)."""
    g = batch_gap(model, x, y, steps, generator)
    ctx, V = g["ctx"], model.cfg.vocab_size
    def e_onehot(ids):  # ids (B, T) -> (B, T): one forward over the whole batch
        return model.energy(ctx, F.one_hot(ids, V).float(), step=steps)
    e_true = e_onehot(y)
    if V <= max_tokens:
        others = torch.arange(V, device=x.device)
    else:
        cpu_gen = torch.Generator().manual_seed(seed)  # which others: reproducible per seed
        others = torch.randperm(V, generator=cpu_gen)[:max_tokens - 1].to(x.device)
    e_all = torch.stack([e_onehot(torch.full_like(y, int(v))) for v in others])  # (N, B, T)
    is_true = others[:, None, None] == y[None]  # (N, B, T): skip the true token among "others"
    e_other = e_all.masked_fill(is_true, float("inf")).min(0).values  # (B, T) best other one-hot
    rank = (e_all.masked_fill(is_true, float("inf")) < e_true[None]).sum(0)  # (B, T) 0 = lowest
    return {"true_minus_final": (e_true - g["final_energy"]).flatten().cpu(),
            "true_minus_best_other": (e_true - e_other).flatten().cpu(),
            "rank": rank.flatten().cpu(), "n_compared": len(others),
            "frac_true_lowest": (rank == 0).float().mean().item(),
            "frac_true_below_final": (e_true < g["final_energy"]).float().mean().item()}
