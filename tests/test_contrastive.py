"""Contrastive energy shaping: CD, PCD and fast-PCD (SPEC §4), on tiny CPU models."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from nanoebm.config import ModelConfig, TrainRunConfig
from nanoebm.losses import EnergyShaping, ebt_loss, energy_margin, langevin, last_landscape
from nanoebm.model import EBT

os.environ["WANDB_MODE"] = "disabled"
V, T = 11, 8


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=V, dropout=0.0,
                use_contrastive=True, langevin_noise_scale=0.0, contrastive_k=2,
                langevin_step_size=0.5, restart_prob=0.0)
    base.update(kw)
    return ModelConfig(**base)


def setup(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny(**kw)
    model = EBT(cfg)
    return cfg, model, EnergyShaping(cfg, model)


def batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def energy_of(model, ctx, z):
    return model.energy(ctx, torch.softmax(z, -1), step=last_landscape(model.cfg))


# ----------------------------------------------------------------------- the two phases
@pytest.mark.parametrize("kind", ["cd", "pcd", "fast_pcd"])
def test_positive_phase_has_gradient_negatives_carry_no_graph(kind):
    cfg, model, sh = setup(contrastive_type=kind)
    x, y = batch()
    neg = sh.persistent_negatives(model, x) if kind != "cd" else None
    ctx = model.context(x)
    z_pred = ctx.s1_logits.detach()
    loss, parts = sh.contrastive(model, ctx, y, z_pred, neg)
    params = [p for p in model.parameters() if p.requires_grad]
    g_pos = torch.autograd.grad(parts["E_pos_t"].mean(), params, retain_graph=True, allow_unused=True)
    named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], g_pos))
    for name in ("energy_head.weight", "blocks.0.attn.qkv.weight", "wte.weight"):
        assert named[name] is not None and named[name].abs().sum() > 0, name
    # the loss is the documented formula of the two phases
    Ep, En = parts["E_pos_t"], parts["E_neg_t"]
    ref = Ep.mean() - En.mean() + cfg.contrastive_reg * (Ep.pow(2).mean() + En.pow(2).mean())
    torch.testing.assert_close(loss, ref)
    # the positive is the true next token as a one-hot candidate
    torch.testing.assert_close(Ep, model.energy(ctx, F.one_hot(y, V).float(), step=last_landscape(cfg)))
    if neg is not None:
        assert neg[1].grad_fn is None and not neg[1].requires_grad
        assert sh.z.grad_fn is None and not sh.z.requires_grad
    # the negative phase pushes energies up: gradient of -E_neg is non-zero too
    g_neg = torch.autograd.grad(-En.mean(), model.energy_head.weight)[0]
    assert g_neg.abs().sum() > 0


def test_langevin_matches_hand_computed_steps_and_is_detached():
    cfg, model, _ = setup()
    x, _ = batch()
    ctx = model.context(x)
    z0 = torch.randn(4, T, V)
    z = langevin(model, ctx, z0, 2, 0.5, 0.0)
    assert z.grad_fn is None and not z.requires_grad
    ref = z0
    for _ in range(2):
        r = ref.clone().requires_grad_(True)
        g, = torch.autograd.grad(energy_of(model, ctx, r).sum(), r)
        ref = (r - 0.5 * g).detach()
    torch.testing.assert_close(z, ref)
    assert (z - z0).abs().max() > 1e-4  # the chain really moved
    # noise: std of the added Gaussian is langevin_noise_scale
    zn = langevin(model, ctx, z0, 1, 0.0, 0.3)
    assert abs((zn - z0).std().item() - 0.3) < 0.03


def test_cd_starts_from_the_models_prediction():
    cfg, model, sh = setup(contrastive_type="cd", contrastive_k=0)
    x, y = batch()
    ctx = model.context(x)
    z_pred = torch.randn(4, T, V)
    _, parts = sh.contrastive(model, ctx, y, z_pred, None)
    torch.testing.assert_close(parts["E_neg_t"], energy_of(model, ctx, z_pred))


def test_ebt_loss_adds_weighted_contrastive_term():
    cfg, model, sh = setup(contrastive_type="cd", contrastive_weight=0.37)
    x, y = batch()
    loss, m = ebt_loss(model, x, y, shaping=sh)
    cfg0 = tiny(use_contrastive=False)
    model.cfg = cfg0  # same weights, contrastive off: deterministic CE objective
    loss0, _ = ebt_loss(model, x, y)
    torch.testing.assert_close(loss, loss0 + 0.37 * m["cd_loss"])
    model.cfg = cfg
    with pytest.raises(ValueError, match="EnergyShaping"):
        ebt_loss(model, x, y)


def test_energy_margin_counts_positions_below_both():
    cfg, model, _ = setup(contrastive_k=0)
    x, y = batch()
    ctx = model.context(x)
    z = torch.randn(4, T, V)
    E_pos = model.energy(ctx, F.one_hot(y, V).float(), step=last_landscape(cfg))
    E_neg = torch.randn(4, T)
    m = energy_margin(model, ctx, y, z, E_neg)
    ref = ((E_pos < E_neg) & (E_pos < energy_of(model, ctx, z))).float().mean()
    torch.testing.assert_close(m["energy_margin"], ref)


# --------------------------------------------------------------------------------- PCD
def test_pcd_chain_continues_on_its_own_window():
    cfg, model, sh = setup(contrastive_type="pcd", n_persistent=6)
    x1, _ = batch(B=2, seed=1)
    sh.persistent_negatives(model, x1)
    for seed in (2, 3, 4):  # new batches: records keep their windows unless restarted
        x_old, z_old, used_old = sh.x.clone(), sh.z.clone(), sh.used.clone()
        x, _ = batch(B=2, seed=seed)
        ctx_neg, z_neg = sh.persistent_negatives(model, x)
        changed = (sh.z != z_old).flatten(1).any(1)  # (N,)
        continued = changed & used_old
        fresh = changed & ~used_old
        assert changed.sum() == 2  # min(B, n_persistent) chains per step
        for i in continued.nonzero().flatten().tolist():
            assert torch.equal(sh.x[i], x_old[i])  # same window, not re-paired
            ref = langevin(model, model.context(x_old[i:i + 1]), z_old[i:i + 1], cfg.contrastive_k,
                           cfg.langevin_step_size, 0.0)
            torch.testing.assert_close(sh.z[i:i + 1], ref)  # continued from where it stopped
        for i in fresh.nonzero().flatten().tolist():  # a new chain takes a window of this batch
            assert any(torch.equal(sh.x[i], r) for r in x)
        # the negatives returned are the chains' states, with their own windows' context
        rows = [i for i in range(6) if changed[i]]
        got = sorted(z_neg.flatten(1).tolist())
        assert got == sorted(sh.z[rows].flatten(1).tolist())
        assert ctx_neg.kv[0][0].shape[0] == 2
    assert 0 < sh.used.float().mean() <= 1


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_pcd_restarts_at_configured_rate(p):
    cfg, model, sh = setup(contrastive_type="pcd", n_persistent=8, restart_prob=p,
                           contrastive_k=0, buffer_init_std=2.0)
    x, _ = batch(B=8)
    sh.persistent_negatives(model, x)  # fills all 8 slots (not restarts)
    assert sh.restarts_total == 0 and bool(sh.used.all())
    n_calls = 60
    for _ in range(n_calls):
        sh.persistent_negatives(model, x)
    rate = sh.restarts_total / (8 * n_calls)
    assert abs(rate - p) < 0.09  # > 4 binomial std at p=0.3
    assert abs(sh.z.std().item() - 2.0) < 0.2  # chains start from N(0, buffer_init_std^2)


def test_pcd_buffer_fill_and_restart_metrics_logged():
    cfg, model, sh = setup(contrastive_type="pcd", n_persistent=8, restart_prob=0.5)
    x, y = batch(B=2)
    _, m = ebt_loss(model, x, y, want_metrics=True, shaping=sh)
    assert m["buffer_fill"].item() == pytest.approx(2 / 8)
    for key in ("cd_loss", "E_pos", "E_neg", "energy_margin", "restarts"):
        assert key in m and torch.isfinite(m[key])


# ---------------------------------------------------------------------------- fast-PCD
def test_fast_weights_nonzero_after_a_step_and_equal_negative_phase_gradient():
    cfg, model, sh = setup(contrastive_type="fast_pcd", n_chains=3, fast_lr=0.05)
    assert all(f.abs().sum() == 0 for f in sh.fast.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch()
    ebt_loss(model, x, y, shaping=sh)
    assert sum(f.abs().sum() for f in sh.fast.values()) > 0
    for n, p in model.named_parameters():  # the in-place swap restored theta exactly
        assert torch.equal(p, before[n]), n
    # reference: theta_fast = -fast_lr * d/dtheta(-mean E_neg + reg mean E_neg^2) over all chains,
    # at theta + theta_fast = theta (theta_fast was zero while sampling)
    E = energy_of(model, model.context(sh.x), sh.z)
    term = -E.mean() + cfg.contrastive_reg * E.pow(2).mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(term, [params[n] for n in sh.fast], allow_unused=True)
    for (n, f), g in zip(sh.fast.items(), grads):
        ref = torch.zeros_like(f) if g is None else -cfg.fast_lr * g
        torch.testing.assert_close(f, ref, atol=1e-7, rtol=1e-4, msg=n)


def test_fast_weights_decay_geometrically_with_zero_gradient():
    cfg, model, sh = setup(contrastive_type="fast_pcd", fast_decay=0.8, fast_lr=0.1)
    f0 = {n: torch.randn_like(f) for n, f in sh.fast.items()}
    for n in sh.fast:
        sh.fast[n].copy_(f0[n])
    for _ in range(3):
        sh.update_fast([None] * len(sh.fast))
    for n, f in sh.fast.items():
        torch.testing.assert_close(f, f0[n] * 0.8 ** 3)
    g = [torch.ones_like(f) for f in sh.fast.values()]
    sh.update_fast(g)
    for n, f in sh.fast.items():
        torch.testing.assert_close(f, f0[n] * 0.8 ** 4 - 0.1)


def test_fast_weights_change_the_negatives_versus_plain_pcd():
    _, model, fast = setup(contrastive_type="fast_pcd", n_chains=4)
    _, _, pcd = setup(contrastive_type="pcd", n_persistent=4)
    x, _ = batch(B=4)
    fast.persistent_negatives(model, x)
    state = (fast.x.clone(), fast.z.clone(), fast.used.clone())

    def negs(sh, fast_value):
        sh.x, sh.z, sh.used = (t.clone() for t in state)  # both start from the same chains
        for f in fast.fast.values():
            f.fill_(fast_value)
        torch.manual_seed(5)  # same chain order for both
        return sh.persistent_negatives(model, x)[1]

    z_pcd = negs(pcd, 0.0)
    torch.testing.assert_close(negs(fast, 0.0), z_pcd)  # theta_fast = 0: exactly plain PCD
    z_fast = negs(fast, 0.05)
    assert (z_fast - z_pcd).abs().max() > 1e-3  # sampled under theta + theta_fast


def test_energy_state_roundtrip():
    cfg, model, sh = setup(contrastive_type="fast_pcd", n_chains=3, replay_buffer_size=4)
    x, y = batch()
    ebt_loss(model, x, y, shaping=sh)
    ebt_loss(model, x, y, shaping=sh)
    sd = sh.state_dict()
    sh2 = EnergyShaping(cfg, model)
    sh2.load_state_dict(sd)
    for a, b in ((sh.x, sh2.x), (sh.z, sh2.z), (sh.replay.z, sh2.replay.z)):
        assert torch.equal(a, b)
    assert all(torch.equal(sh.fast[n], sh2.fast[n]) for n in sh.fast)
    with pytest.raises(ValueError, match="contrastive"):
        EnergyShaping(tiny(contrastive_type="pcd"), model).load_state_dict(sd)
