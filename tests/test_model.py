"""The energy transformer: two-stream attention against a dense-mask reference, masking by
perturbation, the KV cache, and the refinement gradient against finite differences.

    uv run pytest tests/test_model.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nanoebm.model import EBT, apply_rope
from nanoebm.think import entropy
from tests.conftest import tiny_cfg


def make(seed=0, **kw):
    torch.manual_seed(seed)
    m = EBT(tiny_cfg(**kw)).double().eval()
    # non-trivial weights everywhere (init has tiny residual outputs and unit norms)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def dense_reference_energy(m: EBT, idx, p):
    """The paper's simple form (§C.4): one 2T sequence [x; candidates] with a generalised mask.
    x_i sees x_0..x_i; candidate t sits at RoPE position t+1 and sees x_0..x_t and itself."""
    B, T = idx.shape
    h = torch.cat([m.wte(idx), p @ m.w_cand], dim=1)  # (B, 2T, D)
    pos = torch.cat([torch.arange(T), torch.arange(T) + 1])
    allow = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    allow[:T, :T] = torch.ones(T, T).tril().bool()
    allow[T:, :T] = torch.ones(T, T).tril().bool()
    allow[T:, T:] = torch.eye(T, dtype=torch.bool)
    cos, sin = m.rope_cos[pos], m.rope_sin[pos]
    for blk in m.blocks:
        a = blk.attn
        q, k, v = a._split(blk.ln1(h))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(a.head_dim)
        y = att.masked_fill(~allow, float("-inf")).softmax(-1) @ v
        h = h + a.proj(y.transpose(1, 2).reshape(B, 2 * T, -1))
        h = h + blk.mlp(blk.ln2(h))
    s1 = m.s1_head(m.ln_f(h[:, :T]))
    return m.energy_head(m.ln_e(h[:, T:])).squeeze(-1), s1


def rand_inputs(m, B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m.cfg.vocab_size, (B, T), generator=g)
    z = torch.randn(B, T, m.cfg.vocab_size, generator=g, dtype=torch.float64)
    return idx, z


def test_two_stream_energy_matches_dense_mask_reference():
    m = make()
    idx, z = rand_inputs(m)
    p = z.softmax(-1)
    E_ref, s1_ref = dense_reference_energy(m, idx, p)
    ctx = m.context(idx)
    assert torch.allclose(m.energy(ctx, p), E_ref, atol=1e-10)
    assert torch.allclose(ctx.s1_logits.double(), s1_ref, atol=1e-10)


def energy_and_grad(m, idx, z, t):
    """E_t and dE_t/dz_t for one position t."""
    z = z.clone().requires_grad_(True)
    E = m.energy(m.context(idx), z.softmax(-1))  # (B, T)
    g, = torch.autograd.grad(E[:, t].sum(), z)
    return E[:, t].detach(), g[:, t]


def test_masking_by_perturbation():
    m = make()
    idx, z = rand_inputs(m)
    t = 3
    E0, g0 = energy_and_grad(m, idx, z, t)
    V = m.cfg.vocab_size
    # things position t must NOT depend on: its target x_{t+1}, later tokens, other candidates
    for j in (t + 1, t + 2, 7):
        idx2 = idx.clone()
        idx2[:, j] = (idx2[:, j] + 1) % V
        E1, g1 = energy_and_grad(m, idx2, z, t)
        assert torch.allclose(E0, E1, atol=1e-12) and torch.allclose(g0, g1, atol=1e-12), j
    for j in (0, t - 1, t + 1, 7):
        z2 = z.clone()
        z2[:, j] += torch.randn(V, dtype=z.dtype)
        E1, g1 = energy_and_grad(m, idx, z2, t)
        assert torch.allclose(E0, E1, atol=1e-12) and torch.allclose(g0, g1, atol=1e-12), j
    # things it MUST depend on: x_t (its newest context token), x_0, and its own candidate z_t
    for j in (0, t):
        idx2 = idx.clone()
        idx2[:, j] = (idx2[:, j] + 1) % V
        E1, g1 = energy_and_grad(m, idx2, z, t)
        assert (E0 - E1).abs().min() > 1e-6 and (g0 - g1).abs().max() > 1e-6
    z2 = z.clone()
    z2[:, t] += torch.randn(V, dtype=z.dtype)
    E1, g1 = energy_and_grad(m, idx, z2, t)
    assert (E0 - E1).abs().min() > 1e-6 and (g0 - g1).abs().max() > 1e-6


def test_s1_logits_are_causal():
    m = make()
    idx, _ = rand_inputs(m)
    s1 = m.context(idx).s1_logits
    idx2 = idx.clone()
    idx2[:, 5] = (idx2[:, 5] + 1) % m.cfg.vocab_size
    s1b = m.context(idx2).s1_logits
    assert torch.allclose(s1[:, :5], s1b[:, :5], atol=1e-12)
    assert (s1[:, 5:] - s1b[:, 5:]).abs().max() > 1e-6


def test_kv_cache_extension_matches_full_context():
    m = make()
    idx, z = rand_inputs(m)
    full = m.context(idx)
    part = m.context(idx[:, 5:], past=m.context(idx[:, :5]))
    for (k1, v1), (k2, v2) in zip(full.kv, part.kv):
        assert torch.allclose(k1, k2, atol=1e-12) and torch.allclose(v1, v2, atol=1e-12)
    assert torch.allclose(full.s1_logits[:, 5:], part.s1_logits, atol=1e-10)
    # the last position's energy from the cached context equals the full computation
    p = z.softmax(-1)
    assert torch.allclose(m.energy(full, p)[:, -1], m.energy(part, p[:, -1:])[:, 0], atol=1e-10)


def objective(m, ctx, z, lam=0.3, tau=0.7):
    p = torch.softmax(z / tau, -1)
    return m.energy(ctx, p).sum() - lam * entropy(p).sum()


def test_refinement_gradient_matches_finite_differences():
    m = make()
    idx, z = rand_inputs(m, B=1, T=4)
    ctx = m.context(idx)
    zr = z.clone().requires_grad_(True)
    g, = torch.autograd.grad(objective(m, ctx, zr), zr)  # dJ/dz  (B, T, V)
    eps = 1e-6
    for (b, t, v) in [(0, 0, 0), (0, 1, 3), (0, 3, 10), (0, 2, 7)]:
        zp, zm = z.clone(), z.clone()
        zp[b, t, v] += eps
        zm[b, t, v] -= eps
        fd = (objective(m, ctx, zp) - objective(m, ctx, zm)) / (2 * eps)
        assert abs(fd.item() - g[b, t, v].item()) < 1e-6 * max(1.0, abs(fd.item()))
    # dJ/dp (think_grad=probs): check the chain rule dJ/dz = J_softmax^T dJ/dp
    p = torch.softmax(z / 0.7, -1).requires_grad_(True)
    J = m.energy(ctx, p).sum() - 0.3 * entropy(p).sum()
    gp, = torch.autograd.grad(J, p)
    chain = p * (gp - (p * gp).sum(-1, keepdim=True)) / 0.7
    assert torch.allclose(chain, g, atol=1e-9)


def test_second_order_gradient_matches_finite_differences():
    """The training signal: d/dtheta of CE(z - alpha * dE/dz) (double backward) vs FD."""
    m = make()
    idx, z = rand_inputs(m, B=1, T=4)
    y = torch.randint(0, m.cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    w = m.blocks[0].attn.qkv.weight

    def loss_fn():
        ctx = m.context(idx)
        zr = z.clone().requires_grad_(True)
        g, = torch.autograd.grad(m.energy(ctx, zr.softmax(-1)).sum(), zr, create_graph=True)
        return F.cross_entropy((z - 2.0 * g).flatten(0, 1), y.flatten())

    grad, = torch.autograd.grad(loss_fn(), w)
    eps = 1e-6
    for (i, j) in [(0, 0), (5, 7), (40, 3), (70, 31)]:  # q, k and v rows of the fused matrix
        with torch.no_grad():
            w[i, j] += eps
        lp = loss_fn()
        with torch.no_grad():
            w[i, j] -= 2 * eps
        lm = loss_fn()
        with torch.no_grad():
            w[i, j] += eps
        fd = (lp - lm).item() / (2 * eps)
        assert abs(fd - grad[i, j].item()) < 1e-6 * max(1.0, abs(fd)), (i, j, fd, grad[i, j])
    assert grad.abs().max() > 0


@pytest.mark.parametrize("n_pos", [16, 1])
def test_fused_candidate_attention_matches_the_explicit_one(n_pos):
    """fused=True (SDPA over [context keys | own key], used where no double backward is
    needed) gives the same energies and the same dE/dp as the explicit attention, for a full
    window and for the one-position KV-cache case."""
    torch.manual_seed(0)
    m = EBT(tiny_cfg()).double().eval()
    x = torch.randint(0, 11, (2, 16))
    ctx = m.context(x)
    p = torch.softmax(torch.randn(2, n_pos, 11, dtype=torch.float64), -1).requires_grad_(True)
    E1 = m.energy(ctx, p)
    E2 = m.energy(ctx, p, fused=True)
    g1, = torch.autograd.grad(E1.sum(), p)
    g2, = torch.autograd.grad(E2.sum(), p)
    assert torch.allclose(E1, E2, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)
    assert g1.abs().max() > 1e-6
