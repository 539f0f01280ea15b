"""step_adaln: per-think-step scale and shift after the candidate stream's norms (AdaLN). Zero
at init (exactly the plain model, the same weights from one seed), step-dependent once trained,
never seen by the context stream, trained by the loss, differentiated by hand in generation's
think step, and saved and loaded with the checkpoint.

    uv run pytest tests/test_step_adaln.py
"""
import dataclasses
import random
from pathlib import Path

import pytest
import torch

import train as train_mod
from nanoebm.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from tests.conftest import repeat_context
from nanoebm.losses import ebt_loss
from nanoebm.model import EBT
from nanoebm.think_at import energy_grad_at, position
from tests.conftest import SMALL, compose, tiny_cfg

V = 11


def pair(**kw):
    """The plain EBT and the step_adaln one, built from the same seed."""
    torch.manual_seed(0)
    plain = EBT(tiny_cfg(**kw))
    torch.manual_seed(0)
    ada = EBT(tiny_cfg(step_adaln=True, **kw))
    return plain, ada


def inputs(B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (B, T), generator=g)
    y = torch.randint(V, (B, T), generator=g)
    p = torch.randn(B, T, V, generator=g).softmax(-1)  # (B, T, V)
    return x, y, p


def perturb(m: EBT, std=0.3, seed=2):
    with torch.no_grad():
        m.adaln.copy_(std * torch.randn(m.adaln.shape, generator=torch.Generator().manual_seed(seed)))


def test_zero_init_is_exactly_the_plain_model():
    plain, ada = pair(think_steps=2, step_embed=True)
    assert ada.adaln.shape == (2, 2, 4, 32) and not ada.adaln.any()
    sd = ada.state_dict()
    assert set(sd) - set(plain.state_dict()) == {"adaln"}
    for k, v in plain.state_dict().items():  # creating the table drew no random numbers
        assert torch.equal(v, sd[k]), k
    x, _, p = inputs()
    ctx = plain.context(x)
    for step in (0, 1, 5):
        for fused in (False, True):
            assert torch.equal(ada.energy(ctx, p, step=step, fused=fused),
                               plain.energy(ctx, p, step=step, fused=fused))
        assert torch.equal(ada.energy_of_tokens(ctx, x, step=step),
                           plain.energy_of_tokens(ctx, x, step=step))
    # the baseline keeps no candidate-stream parameters, AdaLN included
    torch.manual_seed(0)
    base = EBT(tiny_cfg(think_steps=0, step_adaln=True))
    assert base.adaln is None and set(base.state_dict()) < set(plain.state_dict())


def test_modulation_depends_on_the_step_and_never_reaches_the_context():
    plain, ada = pair(think_steps=2)
    perturb(ada)
    x, _, p = inputs()
    c_plain, c_ada = plain.context(x), ada.context(x)
    torch.testing.assert_close(c_ada.s1_logits, c_plain.s1_logits, rtol=0, atol=0)
    for (k0, v0), (k1, v1) in zip(c_plain.kv, c_ada.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    E = [ada.energy(c_ada, p, step=k) for k in range(4)]  # (B, T) each
    assert (E[0] != E[1]).all() and (E[0] - E[1]).abs().max() > 1e-3  # each position's E moves
    assert (E[0] - plain.energy(c_plain, p)).abs().max() > 1e-3
    assert torch.equal(E[2], E[1]) and torch.equal(E[3], E[1])  # past the table: its last entry
    # each block's norms: rmsnorm(c) * (1 + scale_k) + shift_k, checked against a hand loop
    c = p @ ada.w_cand
    Tk = c_ada.length
    cos, sin = ada.rope_cos[1:Tk + 1], ada.rope_sin[1:Tk + 1]
    for i, (block, (k, v)) in enumerate(zip(ada.blocks, c_ada.kv)):
        s1, b1, s2, b2 = ada.adaln[1, i]
        c = c + block.attn.candidate(block.ln1(c) * (1 + s1) + b1, k, v, cos, sin)
        c = c + block.mlp(block.ln2(c) * (1 + s2) + b2)
    E_ref = ada.energy_head(ada.ln_e(c)).squeeze(-1)
    torch.testing.assert_close(E[1], E_ref, rtol=1e-6, atol=1e-6)


def loss_and_grads(m: EBT, x, y):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    random.seed(7)
    loss, _ = ebt_loss(m, x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_loss_trains_the_table_and_changes_with_it():
    plain, ada = pair(think_steps=2)
    plain.train()
    ada.train()
    x, y, _ = inputs()
    l_plain, g_plain = loss_and_grads(plain, x, y)
    l_ada, g_ada = loss_and_grads(ada, x, y)
    # at init: the same loss and gradients, and the table gets a gradient for both steps
    assert torch.equal(l_ada, l_plain)
    for n, g in g_plain.items():
        torch.testing.assert_close(g_ada[n], g, rtol=1e-6, atol=1e-9)
    assert (g_ada["adaln"].flatten(1).abs().sum(1) > 0).all()
    perturb(ada)
    l_mod, g_mod = loss_and_grads(ada, x, y)
    assert abs(l_mod.item() - l_plain.item()) > 1e-4
    assert (g_mod["blocks.0.mlp.gate_up.weight"] - g_plain["blocks.0.mlp.gate_up.weight"]).abs().max() > 1e-4


def test_table_gradient_matches_finite_differences():
    _, ada = pair(think_steps=2)
    ada = ada.double()
    perturb(ada)
    x, _, p = inputs()
    ctx = ada.context(x)
    p = p.double()
    energy = lambda: ada.energy(ctx, p, step=1).sum()  # noqa: E731
    g, = torch.autograd.grad(energy(), ada.adaln)
    assert not g[0].any() and g[1].abs().max() > 1e-3  # step 1 reads its own entry only
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # directional derivatives, central differences
        d, h = torch.randn(ada.adaln.shape, generator=gen, dtype=torch.double), 1e-6
        with torch.no_grad():
            ada.adaln.add_(h * d)
            e_plus = energy()
            ada.adaln.sub_(2 * h * d)
            e_minus = energy()
            ada.adaln.add_(h * d)
        assert (e_plus - e_minus).item() / (2 * h) == pytest.approx((g * d).sum().item(), rel=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(step_embed=True)])
def test_generation_gradient_matches_autograd(kw):
    """energy_grad_at (the hand-written backward) against autograd on EBT.energy."""
    _, ada = pair(think_steps=2, **kw)
    ada = ada.double().eval().requires_grad_(False)
    with torch.no_grad():
        perturb(ada)
        ada.blocks[0].ln1.weight.mul_(1.5)  # gains != 1: their product with the scale matters
        ada.blocks[1].ln2.weight.mul_(0.7)
    x, _, _ = inputs(B=3, T=6)
    ctx = ada.context(x)
    N = 4
    p = torch.randn(3, N, V, dtype=torch.double).softmax(-1)  # (B, N, V)
    for step in (0, 1, 3):
        E, g = energy_grad_at(ada, position(ada, ctx.kv, ctx.length), p, step=step)
        pr = p.reshape(3 * N, 1, V).requires_grad_(True)
        with torch.enable_grad():
            E_ref = ada.energy(repeat_context(ctx, N), pr, step=step)  # (3N, 1)
            g_ref, = torch.autograd.grad(E_ref.sum(), pr)
        torch.testing.assert_close(E, E_ref.view(3, N), rtol=0, atol=1e-12)
        torch.testing.assert_close(g, g_ref.view(3, N, V), rtol=0, atol=1e-12)
    assert g.abs().max() > 1e-3


def test_checkpoint_roundtrip(tmp_path):
    _, ada = pair(think_steps=2)
    perturb(ada)
    path = tmp_path / "ada.pt"
    atomic_save({"model": ada.state_dict(), "model_config": dataclasses.asdict(ada.cfg)}, path)
    back = model_from_checkpoint(load_checkpoint(path))
    assert back.cfg.step_adaln and torch.equal(back.adaln, ada.adaln)
    x, _, p = inputs()
    assert torch.equal(back.energy(back.context(x), p, step=1), ada.energy(ada.context(x), p, step=1))
    # train.py saves it, and a run resumes from it
    run = compose(*SMALL, "model.step_adaln=true", f"out_dir={tmp_path / 'run'}")
    final = Path(train_mod.train(run)["run_dir"]) / "final.pt"
    ck = load_checkpoint(final)
    assert ck["model"]["adaln"].shape == (2, 1, 4, 32) and ck["model"]["adaln"].abs().max() > 0
    resumed = dataclasses.replace(compose(*SMALL, "train.max_steps=3", f"out_dir={tmp_path / 'r'}"),
                                  load_checkpoint=str(final))
    assert train_mod.train(resumed)["step"] == 3
