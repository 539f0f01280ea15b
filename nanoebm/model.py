"""The Energy-Based Transformer: one set of Llama-style blocks run as two streams.

* context stream  - the real tokens x_0..x_{T-1}, ordinary causal self-attention. It never sees a
  candidate, so it runs once per batch; its per-layer keys/values are reused by every think step.
* candidate stream - position t holds a candidate distribution p_t for x_{t+1}, embedded as
  p_t @ W_cand and placed at RoPE position t+1. It attends to context keys x_0..x_t and to itself
  only (never to its target x_{t+1}, later tokens or other candidates), with the same Q/K/V/O
  weights. A final RMSNorm + Linear(D, 1) turns it into one scalar energy E_t per position.
  It alone may know the think step k: step_embed adds an embedding of k to its input, step_adaln
  gives every block's two norms a per-step scale and shift (AdaLN, zero at init).
* System-1 head - Linear(D, V) on the context stream: amortized initial logits. With
  think_steps=0 the model is exactly a plain causal transformer LM (the baseline), and it keeps
  no candidate-stream parameters at all.

The candidate attention is written out with plain tensor ops so that it can be differentiated
twice (training backpropagates through dE/dp). The context stream only needs first-order
gradients, so it uses PyTorch's fused scaled_dot_product_attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoebm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # written out (not F.rms_norm) so every op has a double-backward formula
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def modulate(h, scale, shift):
    """AdaLN: a per-step affine map after a norm, h (..., D) * (1 + scale) + shift; (D,) each."""
    return h * (1 + scale) + shift


def at_least_f32(x):
    """Upcast bf16/fp16 results (autocast) to fp32; leave fp32/fp64 alone."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def rope_tables(n_pos: int, head_dim: int, base: float = 10000.0):
    """cos/sin tables for positions 0..n_pos-1, each (n_pos, head_dim/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ang = torch.outer(torch.arange(n_pos).float(), inv_freq)  # (n_pos, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) = (first half, second half) of each head. x: (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hd/2) broadcast over B, H
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rope_rows(w, cos, sin):
    """RoPE at ONE position folded into projection weights w (..., n*hd, D_in): their output
    rows are rotated so that x @ rope_rows(w).T == apply_rope(x @ w.T) there. cos, sin: (hd/2,)."""
    w = w.unflatten(-2, (-1, 2, cos.shape[-1]))  # (..., n, 2, hd/2, D_in): each head's halves
    w1, w2 = w.unbind(-3)
    cos, sin = cos[:, None].to(w.dtype), sin[:, None].to(w.dtype)  # (hd/2, 1)
    return torch.stack([w1 * cos - w2 * sin, w1 * sin + w2 * cos], -3).flatten(-4, -2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _split(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)  # 3 x (B, T, D)
        return [t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v)]

    def _merge(self, y):
        B, H, T, hd = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, H * hd)))

    def context(self, x, cos, sin, past=None):
        """Causal self-attention over real tokens. Returns output and this layer's full (k, v)."""
        q, k, v = self._split(x)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:  # extend a KV cache: new queries see every cached key
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        Tq, Tk = q.shape[2], k.shape[2]
        p_drop = self.dropout if self.training else 0.0
        if Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop)
        else:  # query i sits at absolute position Tk - Tq + i
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self._merge(y), (k, v)

    def candidate(self, c, k_ctx, v_ctx, cos, sin, fused: bool = False):
        """Candidate t (absolute position pos_t = Tk - Tc + t) attends to context keys 0..pos_t
        and to itself: one softmax over those Tk+1 scores. The explicit ops are the path that
        gets differentiated twice; fused=True (no double backward needed: eval, generation)
        runs the same attention as one SDPA call over [context keys | own key]."""
        q, k, v = self._split(c)  # (B, H, Tc, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        Tc, Tk = q.shape[2], k_ctx.shape[2]
        allowed = torch.ones(Tc, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tc)
        if fused:  # candidate t sees context 0..pos_t and, of the candidate keys, only its own
            own = torch.eye(Tc, dtype=torch.bool, device=q.device)
            mask = torch.cat([allowed, own], dim=1)  # (Tc, Tk + Tc)
            p_drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, torch.cat([k_ctx, k], 2), torch.cat([v_ctx, v], 2),
                                               attn_mask=mask, dropout_p=p_drop)  # (B, H, Tc, hd)
            return self._merge(y)
        scale = 1.0 / math.sqrt(self.head_dim)
        s_ctx = (q @ k_ctx.transpose(-2, -1)) * scale  # (B, H, Tc, Tk)
        s_ctx = s_ctx.masked_fill(~allowed, float("-inf"))  # hides x_{t+1..}: no target leak
        s_self = (q * k).sum(-1, keepdim=True) * scale  # (B, H, Tc, 1)
        w = at_least_f32(torch.cat([s_ctx, s_self], dim=-1)).softmax(-1).to(q.dtype)  # (B,H,Tc,Tk+1)
        w = F.dropout(w, self.dropout, self.training)
        y = w[..., :Tk] @ v_ctx + w[..., Tk:] * v  # (B, H, Tc, hd)
        return self._merge(y)


class MLP(nn.Module):
    """SwiGLU with hidden 8/3·D (rounded), i.e. the same parameter count as a 4·D GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 16 * ((8 * cfg.n_embd // 3 + 15) // 16)
        self.gate_up = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(g) * u))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def context(self, x, cos, sin, past=None):
        a, kv = self.attn.context(self.ln1(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv

    def candidate(self, c, k, v, cos, sin, fused: bool = False, mod=None):
        """mod (4, D): this step's AdaLN (scale, shift) for ln1 then ln2, or None."""
        h = self.ln1(c) if mod is None else modulate(self.ln1(c), mod[0], mod[1])
        c = c + self.attn.candidate(h, k, v, cos, sin, fused)
        h = self.ln2(c) if mod is None else modulate(self.ln2(c), mod[2], mod[3])
        return c + self.mlp(h)


@dataclass
class Context:
    """What the context stream hands to thinking: per-layer (k, v) and the S1 logits."""
    kv: list                      # n_layer x (k, v), each (B, H, T, hd)
    s1_logits: torch.Tensor | None  # (B, T, V) or None when the model has no S1 head

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2]


class EBT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0 and cfg.block_size > 0, "set vocab_size/block_size from the data"
        self.cfg = cfg
        D, V = cfg.n_embd, cfg.vocab_size
        self.wte = nn.Embedding(V, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.w_cand = nn.Parameter(torch.empty(V, D))  # candidate embedding: p @ w_cand
        n_step = max(1, cfg.eval_think_steps)
        self.step_emb = nn.Embedding(n_step, D) if cfg.step_embed else None
        # AdaLN: per step and block, (scale, shift) of ln1 and of ln2. Zero: at init the model is
        # the plain one, and creating it draws no random numbers (the other weights stay the same)
        self.adaln = nn.Parameter(torch.zeros(n_step, cfg.n_layer, 4, D)) if cfg.step_adaln else None
        self.ln_e, self.energy_head = RMSNorm(D), nn.Linear(D, 1, bias=False)
        # the S1 head exists when it starts the chain, is the model (K=0), or gets aux CE
        self.has_s1 = cfg.think_init == "s1" or cfg.think_steps == 0 or cfg.aux_ce_weight > 0
        self.ln_f = RMSNorm(D) if self.has_s1 else None
        self.s1_head = nn.Linear(D, V, bias=False) if self.has_s1 else None
        # alpha, the think step size; learnable when think_lr_learnable (own optimizer group)
        alpha = torch.tensor(float(cfg.think_lr))
        self.has_energy = cfg.has_energy
        if self.has_energy:
            self.alpha = nn.Parameter(alpha, requires_grad=cfg.think_lr_learnable)
        else:  # the baseline never thinks: a constant, so code that reads model.alpha still works
            self.register_buffer("alpha", alpha, persistent=False)
        cos, sin = rope_tables(cfg.block_size + 1, D // cfg.n_head)  # +1: candidates sit at t+1
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.w_cand, std=0.02)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual outputs
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if not self.has_energy:
            # The plain transformer drops the candidate stream. It was built and initialised all
            # the same, so one seed gives the baseline exactly the weights the EBT starts from.
            self.w_cand = self.step_emb = self.adaln = self.ln_e = self.energy_head = None

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def step_conditioned(self) -> bool:
        """Whether the energy depends on the think step k (step_embed or step_adaln)."""
        return self.step_emb is not None or self.adaln is not None

    def step_modulation(self, step: int):
        """AdaLN (n_layer, 4, D) for think step `step` (steps past the table reuse its last
        entry), or None without step_adaln."""
        return None if self.adaln is None else self.adaln[min(step, self.adaln.shape[0] - 1)]

    def context(self, idx, past: Context | None = None) -> Context:
        """Run the context stream on idx (B, T); with `past`, extend that KV cache."""
        pos0 = past.length if past is not None else 0
        T = idx.shape[1]
        assert pos0 + T <= self.cfg.block_size, f"context {pos0 + T} > block_size"
        cos, sin = self.rope_cos[pos0:pos0 + T], self.rope_sin[pos0:pos0 + T]
        x = self.drop(self.wte(idx))  # (B, T, D)
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block.context(x, cos, sin, past.kv[i] if past is not None else None)
            kv.append(layer_kv)
        s1 = at_least_f32(self.s1_head(self.ln_f(x))) if self.has_s1 else None  # (B, T, V)
        return Context(kv=kv, s1_logits=s1)

    def energy(self, ctx: Context, p, step: int = 0, stopgrad_cand: bool = False,
               fused: bool = False):
        """Energy E (B, Tc) of candidate distributions p (B, Tc, V) for the LAST Tc context
        positions (Tc = T in training, 1 when generating with a KV cache). fused=True: SDPA
        attention, first-order differentiable only (thinking that is not trained through)."""
        if not self.has_energy:
            raise ValueError("this model is the plain transformer (model.think_steps=0): it has no "
                             "energy to think with; use its System-1 logits")
        W = self.w_cand.detach() if stopgrad_cand else self.w_cand
        c = p.to(W.dtype) @ W  # (B, Tc, D): the expected embedding under p
        return self.energy_of_embedding(ctx, c, step, fused)

    def energy_of_tokens(self, ctx: Context, tokens, step: int = 0):
        """E (B, Tc) of one-hot candidates, tokens (B, Tc): E(x, onehot(v)) without the (B, Tc, V)
        one-hot tensor (a vocabulary of 50k makes that tensor the largest in the model)."""
        return self.energy_of_embedding(ctx, self.w_cand[tokens], step, fused=True)

    def energy_of_embedding(self, ctx: Context, c, step: int = 0, fused: bool = False):
        """The candidate stream on candidate embeddings c (B, Tc, D) -> energies (B, Tc)."""
        if self.step_emb is not None:  # step conditioning only here: the context stays shared
            c = c + self.step_emb.weight[min(step, self.step_emb.num_embeddings - 1)]
        c = self.drop(c)
        Tc, Tk = c.shape[1], ctx.length
        # candidate for x_{t+1} sits at RoPE position t+1
        cos, sin = self.rope_cos[Tk - Tc + 1:Tk + 1], self.rope_sin[Tk - Tc + 1:Tk + 1]
        mods = self.step_modulation(step)  # (n_layer, 4, D) or None
        for i, (block, (k, v)) in enumerate(zip(self.blocks, ctx.kv)):
            c = block.candidate(c, k, v, cos, sin, fused, None if mods is None else mods[i])
        return at_least_f32(self.energy_head(self.ln_e(c)).squeeze(-1))  # (B, Tc)

    def optim_groups(self, weight_decay: float, lr: float, alpha_lr_mult: float):
        """AdamW groups: matrices decay; norms/embedding-free vectors don't; alpha on its own."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name == "alpha":
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
        if self.alpha.requires_grad:
            groups.append({"params": [self.alpha], "weight_decay": 0.0, "lr_mult": alpha_lr_mult})
        return groups
