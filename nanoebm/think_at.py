"""Thinking at one position: generation's think step, eager or compiled.

Generating a token thinks about ONE position with the context fixed, so a step does much less
than `think`: the candidate stream runs for that position only, reading the cached keys/values
in place, with RoPE there folded into the q/k weights once per token (`position`); best-of-N's
N chains are N queries sharing their row's cache; and dE/dp is written out by hand
(`energy_grad_at`), because at one position a step is a few hundred tiny ops and autograd's
bookkeeping would cost more than the arithmetic. `Thinker(model, compile=True)` runs the same
step through torch.compile on a context padded to fixed-size buffers, so one graph serves the
whole generation (on CUDA replayed as a CUDA graph). Tests hold it equal to `think`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoebm.model import EBT, Context, at_least_f32, rope_rows
from nanoebm.think import ThinkOut, without_sharpening


@dataclass
class Folded:
    """The weights a one-position step reads, with every fixed linear map in front of them
    folded in: the RMSNorm gains (not ln1's under step_adaln: the step's scale and shift follow
    it), the score scale 1/sqrt(hd). Once per generation."""
    qk: torch.Tensor              # (n_layer, 2D, D): the q and k rows of qkv
    v: torch.Tensor               # (n_layer, D, D): the v rows
    energy: torch.Tensor          # (D,): the energy head
    norms: torch.Tensor | None    # step_adaln (n_step, n_layer, 4, D): per step the map after
                                  # ln1 and ln2, x * (gain * (1 + scale)) + shift: factor, shift


@dataclass
class Position:
    """The candidate stream at one position, prepared once per generated token."""
    kv: list                      # n_layer x (k, v), each (B, H, T, hd): the context, in place
    w_qkv: list                   # n_layer x (3D, D): Folded's, with RoPE at the position
    w_energy: torch.Tensor        # (D,)
    bias: torch.Tensor | None = None  # (1, 1, 1, T): 0 on real keys, -inf on unused cache slots
    norms: torch.Tensor | None = None  # Folded's


def fold_weights(model: EBT) -> Folded:
    D, hd = model.cfg.n_embd, model.cfg.n_embd // model.cfg.n_head
    w = torch.stack([b.attn.qkv.weight for b in model.blocks])  # (L, 3D, D)
    if model.adaln is None:  # under AdaLN ln1's gain is applied with the step's scale instead
        w = w * torch.stack([b.ln1.weight for b in model.blocks])[:, None]  # (L, 1, D) gains
    q, k, v = w.split(D, dim=1)  # (L, D, D) each
    norms = None
    if model.adaln is not None:  # x * (gain * (1 + scale)) + shift per step, layer and norm
        g = torch.stack([torch.stack([b.ln1.weight, b.ln2.weight]) for b in model.blocks])  # (L, 2, D)
        scale, shift = model.adaln[:, :, 0::2], model.adaln[:, :, 1::2]  # (n_step, L, 2, D) each
        norms = torch.stack([g * (1 + scale), shift], 3).flatten(2, 3)  # (n_step, L, 4, D)
    return Folded(qk=torch.cat([q / math.sqrt(hd), k], 1), v=v,
                  energy=model.energy_head.weight[0] * model.ln_e.weight, norms=norms)


def position(model: EBT, kv: list, pos: int, bias: torch.Tensor | None = None,
             folded: Folded | None = None) -> Position:
    """Candidates for the token after a context of length `pos` sit at RoPE position pos: the
    rotation there is a fixed linear map too, folded into the q/k rows once per token."""
    f = folded or fold_weights(model)
    qk = rope_rows(f.qk, model.rope_cos[pos], model.rope_sin[pos])  # (L, 2D, D)
    return Position(kv, list(torch.cat([qk, f.v], 1).unbind(0)), f.energy, bias, f.norms)


def step_norms(pos: Position, step: int):
    """The norms' affine maps (L, 4, D) at think step `step` (past the table: its last), or None."""
    return None if pos.norms is None else pos.norms[min(step, pos.norms.shape[0] - 1)]


def _rms(x, eps):
    """x / rms(x) (model.RMSNorm without its gain) and the factor 1/rms, (M, 1)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * r, r


def _rms_backward(xn, r, dxn):
    """d/dx of xn = x * r(x), r = (mean(x^2) + eps)^-1/2, given d/dxn."""
    return r * (dxn - xn * (xn * dxn).mean(-1, keepdim=True))


def energy_at(model: EBT, pos: Position, p, step: int = 0, tape: list | None = None):
    """Energy E (B, N) of N candidate distributions p (B, N, V) per row, all for the next token:
    EBT.energy at one position (each candidate attends to the whole context and to itself), no
    dropout. The stream is kept as (M = B*N, D). With `tape` the activations the backward needs
    are appended to it."""
    B, N, V = p.shape
    H, D = model.cfg.n_head, model.cfg.n_embd
    W = model.w_cand
    c = p.reshape(B * N, V).to(W.dtype) @ W  # (M, D)
    if model.step_emb is not None:
        c = c + model.step_emb.weight[min(step, model.step_emb.num_embeddings - 1)]
    norms = step_norms(pos, step)  # (L, 4, D) or None
    for i, (block, (k_ctx, v_ctx), w_qkv) in enumerate(zip(model.blocks, pos.kv, pos.w_qkv)):
        h, r1 = _rms(c, block.ln1.eps)
        x = h if norms is None else torch.addcmul(norms[i, 1], h, norms[i, 0])  # AdaLN
        q, k, v = (x @ w_qkv.t()).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B,H,N,hd)
        s_ctx = q @ k_ctx.transpose(-2, -1)  # (B, H, N, T)
        if pos.bias is not None:
            s_ctx = s_ctx + pos.bias
        s_self = (q * k).sum(-1, keepdim=True)  # (B, H, N, 1): its own key, nobody else's
        a = at_least_f32(torch.cat([s_ctx, s_self], -1)).softmax(-1).to(q.dtype)  # (B,H,N,T+1)
        y = a[..., :-1] @ v_ctx + a[..., -1:] * v  # (B, H, N, hd)
        c2 = c + block.attn.proj(y.transpose(1, 2).reshape(B * N, D))  # (M, D)
        h2, r2 = _rms(c2, block.ln2.eps)
        x2 = h2 * block.ln2.weight if norms is None else torch.addcmul(norms[i, 3], h2, norms[i, 2])
        gate, up = block.mlp.gate_up(x2).chunk(2, dim=-1)  # (M, hidden)
        sig = torch.sigmoid(gate)
        act = gate * sig  # silu
        if tape is not None:
            tape.append((h, r1, q, k, v, a, h2, r2, up, sig, act))
        c = c2 + block.mlp.down(act * up)
    h, r = _rms(c, model.ln_e.eps)
    if tape is not None:
        tape.append((h, r))
    return at_least_f32(h @ pos.w_energy).view(B, N)


def energy_grad_at(model: EBT, pos: Position, p, step: int = 0):
    """E (B, N) and dE/dp (B, N, V): energy_at and its backward, written out (chains do not
    see each other, so d(sum E)/dp gives each chain its own gradient)."""
    tape = []
    E = energy_at(model, pos, p, step, tape)
    B, N, V = p.shape
    H, D = model.cfg.n_head, model.cfg.n_embd
    h, r = tape.pop()
    dc = _rms_backward(h, r, pos.w_energy)  # dE/dc_L (M, D)
    norms = step_norms(pos, step)  # (L, 4, D) or None
    # the factor each norm's output is multiplied by (ln1's gain is in w_qkv without AdaLN);
    # the shifts are constants and drop out
    gains = [(None, b.ln2.weight) if norms is None else (norms[i, 0], norms[i, 2])
             for i, b in enumerate(model.blocks)]
    layers = list(zip(model.blocks, pos.kv, pos.w_qkv, tape, gains))
    for block, (k_ctx, v_ctx), w_qkv, saved, (gain1, gain2) in reversed(layers):
        h, r1, q, k, v, a, h2, r2, up, sig, act = saved
        # MLP: c_next = c2 + down(silu(gate) * up), [gate, up] = gate_up(rms(c2) * gain2 + shift)
        dm = dc @ block.mlp.down.weight  # (M, hidden)
        dgate = dm * up * (sig + act * (1 - sig))  # silu'(x) = s(x) + x s(x) (1 - s(x))
        dh2 = torch.cat([dgate, dm * act], -1) @ block.mlp.gate_up.weight  # (M, D)
        dc2 = dc + _rms_backward(h2, r2, dh2 * gain2)
        # attention: c2 = c + proj(y), y = a_ctx @ v_ctx + a_self * v, a = softmax([q.k_ctx, q.k])
        dy = (dc2 @ block.attn.proj.weight).view(B, N, H, D // H).transpose(1, 2)  # (B,H,N,hd)
        da = torch.cat([dy @ v_ctx.transpose(-2, -1), (dy * v).sum(-1, keepdim=True)], -1)
        ds = a * (da - (a * da).sum(-1, keepdim=True))  # softmax backward (B, H, N, T+1)
        dq = ds[..., :-1] @ k_ctx + ds[..., -1:] * k  # (B, H, N, hd)
        dqkv = torch.stack([dq, ds[..., -1:] * q, a[..., -1:] * dy]).permute(1, 3, 0, 2, 4)
        dh = dqkv.reshape(B * N, 3 * D) @ w_qkv  # (M, D)
        dc = dc2 + _rms_backward(h, r1, dh if gain1 is None else dh * gain1)
    return E, (dc @ model.w_cand.t().to(dc.dtype)).view(B, N, V)


def objective_grad(model: EBT, pos: Position, z, k: int):
    """Think's J = sum E - entropy_weight * sum H(p) and its gradient: dJ/dp (think_grad=probs,
    hybrid) or dJ/dz (logits). Returns (E, p, g)."""
    cfg = model.cfg
    p = torch.softmax(z / cfg.softmax_temperature, dim=-1)  # (B, N, V)
    E, g = energy_grad_at(model, pos, p, k)
    if cfg.entropy_weight:  # H = -sum p log(clamp(p, 1e-20)): dH/dp = -log(clamp p) - [p >= 1e-20]
        g = g + cfg.entropy_weight * (p.clamp_min(1e-20).log() + (p >= 1e-20).to(p.dtype))
    if cfg.think_grad == "logits":  # back through the softmax
        g = p * (g - (p * g).sum(-1, keepdim=True)) / cfg.softmax_temperature
    return E, p, g


def think_step(model: EBT, pos: Position, z, eps, anchor, alpha, k: int, accept: bool):
    """think's step k at inference for chains z (B, N, V) at one position. eps: Langevin noise
    to add (or None); anchor: the prox anchor (or None); alpha: the step size (0-d tensor).
    Returns z_next, E(z) and, with accept, the energy of the candidate kept."""
    cfg = model.cfg
    if eps is not None:
        z = z + eps
    E, p, g = objective_grad(model, pos, z, k)
    base = p if cfg.think_grad == "probs" else z
    if cfg.think_prox_weight:
        g = g + cfg.think_prox_weight * (base - anchor)
    if cfg.think_max_move > 0:
        bound = cfg.think_max_move / alpha
        g = torch.maximum(torch.minimum(g, bound), -bound)
    move = alpha * g
    if cfg.think_neutral:
        move = without_sharpening(move, base)
    z_next = base - move
    if not accept:
        return z_next, E, None
    E_next = energy_at(model, pos, torch.softmax(z_next / cfg.softmax_temperature, -1), k)
    keep = E_next < E  # keep the step only where it lowers that chain's energy
    return torch.where(keep.unsqueeze(-1), z_next, z), E, torch.where(keep, E_next, E)


def final_energy_at(model: EBT, pos: Position, z, k: int):
    """E(z_K) (B, N): the energy of the final candidates."""
    return energy_at(model, pos, torch.softmax(z / model.cfg.softmax_temperature, -1), k)


class PaddedKV:
    """The context keys/values copied into fixed-size buffers (B, H, n_slots, hd), with a bias
    (1, 1, 1, n_slots) of 0 on the filled slots and -inf on the rest: the think step's shapes
    then stay the same for every token (one compiled graph, CUDA graphs possible)."""

    def __init__(self, n_slots: int):
        self.n_slots, self.kv = n_slots, None

    def __call__(self, ctx: Context) -> tuple[list, torch.Tensor]:
        k0 = ctx.kv[0][0]
        if self.kv is None or self.kv[0][0].shape[0] != k0.shape[0]:
            shape = k0.shape[:2] + (self.n_slots, k0.shape[3])
            self.kv = [(k0.new_zeros(shape), k0.new_zeros(shape)) for _ in ctx.kv]
            self.slot = torch.arange(self.n_slots, device=k0.device).view(1, 1, 1, -1)
        T = ctx.length
        for (kb, vb), (k, v) in zip(self.kv, ctx.kv):
            kb[:, :, :T].copy_(k)
            vb[:, :, :T].copy_(v)
        bias = torch.zeros((), device=k0.device).masked_fill(self.slot >= T, float("-inf"))
        return self.kv, bias


class Thinker:
    """Runs generation's think steps, eagerly or through torch.compile (compile=True). A
    compilation that fails falls back to eager with a one-line note."""

    def __init__(self, model: EBT, compile: bool = False):
        self.model, self.compiled, self.compile_s, self.warm = model, compile, 0.0, False
        self.step, self.energy, self.padded = think_step, final_energy_at, None
        self.folded = fold_weights(model)
        self.cuda_graphs = compile and model.rope_cos.device.type == "cuda"
        if compile:  # fixed shapes on CUDA: each step is captured once and replayed
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.step = torch.compile(think_step, mode=mode, fullgraph=True)
            self.energy = torch.compile(final_energy_at, mode=mode, fullgraph=True)
            self.padded = PaddedKV(model.cfg.block_size)

    def position(self, ctx: Context) -> Position:
        """The candidate stream for the token after ctx: the cache read in place (eager) or
        padded to block_size (compiled)."""
        if self.padded is None:
            return position(self.model, ctx.kv, ctx.length, folded=self.folded)
        kv, bias = self.padded(ctx)
        return position(self.model, kv, ctx.length, bias, self.folded)

    def _run(self, fn, eager, *args):
        """fn(*args). The first calls of a compiled fn compile it (timed in compile_s); if that
        fails, this and every later call run eagerly."""
        if not self.compiled:
            return eager(*args)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # no C++ compiler, an unsupported op, ...
            print(f"note: torch.compile of the think step failed ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:100]}); thinking runs eagerly")
            self.compiled, self.step, self.energy = False, think_step, final_energy_at
            return eager(*args)
        if not self.warm:
            self.compile_s += time.perf_counter() - t0
        if self.cuda_graphs:  # the next replay overwrites the outputs' memory: keep copies
            keep = lambda t: t.clone() if torch.is_tensor(t) else t  # noqa: E731
            out = tuple(map(keep, out)) if isinstance(out, tuple) else keep(out)
        return out

    @torch.no_grad()
    def think(self, pos: Position, z0, steps: int, *, noise: float = 0.0, lr: float | None = None,
              accept_lower_energy: bool = False, final_energy: bool = False,
              generator: torch.Generator | None = None) -> ThinkOut:
        """`steps` think steps from z0 (B, N, V) at one position: think()'s inference result
        (the same noise draws from `generator`), minus what nobody reads."""
        model, cfg = self.model, self.model.cfg
        anchor = None
        if cfg.think_prox_weight:
            probs = cfg.think_grad == "probs"
            anchor = torch.softmax(z0 / cfg.softmax_temperature, -1) if probs else z0
        if self.compiled:  # one graph for every step: the same strides, no input aliasing another
            z0 = z0.clone(memory_format=torch.contiguous_format)
            if anchor is not None:
                anchor = anchor.clone(memory_format=torch.contiguous_format)
        out, z, E_kept = ThinkOut(z0=z0), z0, None
        # alpha as a 0-d tensor: the trained one (clamped as in training) or lr
        alpha = model.alpha.detach().clamp(min=1e-4) if lr is None else torch.tensor(
            float(lr), device=model.alpha.device)
        for k in range(steps):
            eps = None
            if noise > 0:
                eps = noise * torch.randn(z.shape, device=z.device, generator=generator)
            z, E, E_kept = self._run(self.step, think_step, model, pos, z, eps, anchor, alpha, k,
                                     accept_lower_energy)
            out.energies.append(E)
            out.logits.append(z)
        if final_energy:  # accept_lower_energy measured E(z_K) already (same step conditioning)
            reuse = E_kept is not None and not model.step_conditioned
            out.final_energy = E_kept if reuse else self._run(self.energy, final_energy_at, model,
                                                              pos, z, steps)
        self.warm = self.compiled
        return out
