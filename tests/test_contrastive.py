"""Contrastive energy shaping: CD, PCD and fast-PCD, on tiny CPU models, plus the
users' contrastive / long-run train.py commands with small sizes appended.

    uv run pytest tests/test_contrastive.py
"""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train as train_py
from nanoebm.config import ModelConfig
from nanoebm.losses import ebt_loss
from nanoebm.shaping import EnergyShaping, energy_margin, langevin, last_landscape
from nanoebm.model import EBT
from tests.conftest import REPO, SMALL, compose

V, T = 11, 8


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=V, dropout=0.0,
                use_contrastive=True, langevin_noise_scale=0.0, contrastive_k=2,
                langevin_step_size=0.5, restart_prob=0.0,
                think_noise=0.0, think_lr_random_scale=1.0)  # deterministic think steps
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
    g_pos = torch.autograd.grad(parts["E_pos_t"].mean(), params, retain_graph=True,
                                allow_unused=True)
    named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], g_pos))
    for name in ("energy_head.weight", "blocks.0.attn.qkv.weight", "wte.weight"):
        assert named[name] is not None and named[name].abs().sum() > 0, name
    # the loss is the documented formula of the two phases
    Ep, En = parts["E_pos_t"], parts["E_neg_t"]
    ref = Ep.mean() - En.mean() + cfg.contrastive_reg * (Ep.pow(2).mean() + En.pow(2).mean())
    torch.testing.assert_close(loss, ref)
    # the positive is the true next token as a one-hot candidate
    onehot = F.one_hot(y, V).float()  # (B, T, V)
    torch.testing.assert_close(Ep, model.energy(ctx, onehot, step=last_landscape(cfg)))
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


# ------------------------------------------------------------------- training runs (train.py)
def rows(summary):
    path = Path(summary["run_dir"]) / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()]


TINY_RUN = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.block_size=16",
            "data.batch_size=8", "train.learning_rate=3e-3", "train.warmup_iters=10",
            "train.eval_iters=4", "train.eval_interval=1000", "model.dropout=0.0"]


@pytest.mark.slow
def test_energies_stay_bounded_over_200_steps_at_weight_1(tmp_path):
    """The earlier repo's mean energy went 0.2 -> 40 in 300 steps at weight 1. With both phases
    trained and the square term, energies settle near -+1/(2 reg) = -+5."""
    s = train_py.train(compose(*TINY_RUN, "data.batch_size=4", "train.max_steps=200",
                               "train.log_interval=10", "train.eval_iters=1",
                               "model.use_contrastive=true", "model.contrastive_type=pcd",
                               "model.contrastive_weight=1.0", f"out_dir={tmp_path}"))
    logged = [r for r in rows(s) if "E_pos" in r]
    assert len(logged) == 21 and all(math.isfinite(r["loss"]) for r in logged)
    for r in logged:
        for key in ("E_pos", "E_neg", "energy_before", "energy_after"):
            assert abs(r[key]) < 1 / 0.1, (r["step"], key, r[key])  # 2x the optimum
    assert logged[-1]["E_pos"] < logged[0]["E_pos"] - 1  # it did shape: data energy went down
    assert logged[-1]["E_neg"] > logged[-1]["E_pos"] + 1
    assert {"cd_loss", "energy_margin", "buffer_fill", "restarts"} <= set(logged[-1])


@pytest.mark.slow
def test_cd_improves_the_energy_margin_over_no_contrastive(tmp_path):
    """Same seed, steps and data: the true token ends below the model's own prediction and the
    negatives at more val positions when CD is on."""
    base = [*TINY_RUN, "train.max_steps=100", "train.log_interval=1000", "model.think_prox_weight=0",
            "model.think_noise=0", "model.think_lr_random_scale=1"]  # plain steps, as measured
    off = train_py.train(compose(*base, f"out_dir={tmp_path / 'off'}"))
    on = train_py.train(compose(*base, "model.use_contrastive=true", f"out_dir={tmp_path / 'on'}"))
    assert on["val_energy_margin"] > off["val_energy_margin"] + 0.2
    assert on["val_loss"] < off["val_loss"] + 0.1  # and CE did not pay for it


CONTRASTIVE_SEED_COMMANDS = [  # shared/seed-commands.md, train.py lines with contrastive
    "model.use_contrastive=true",
    "model.use_contrastive=true model.contrastive_type=pcd",
    "model.use_contrastive=true model.contrastive_type=fast_pcd",
    "model.use_contrastive=true model.contrastive_type=cd model.contrastive_k=5 "
    "model.contrastive_weight=0.2 model.langevin_step_size=0.01 model.langevin_noise_scale=0.005",
    "model.use_contrastive=true model.contrastive_weight=0.1 train.max_steps=100",
    "model.use_contrastive=true model.contrastive_type=pcd model.contrastive_weight=0.2 "
    "train.max_steps=100",
    "model.use_contrastive=true model.contrastive_weight=0.01 model.contrastive_k=1 "
    "train.max_steps=100",
]


@pytest.mark.parametrize("cmd", CONTRASTIVE_SEED_COMMANDS)
def test_contrastive_seed_command_runs(cmd, tmp_path):
    s = train_py.train(compose(*shlex.split(cmd), *SMALL, f"out_dir={tmp_path}"))
    assert s["step"] == 2 and math.isfinite(s["val_loss"])
    assert 0 <= s["val_energy_margin"] <= 1
    last = [r for r in rows(s) if "cd_loss" in r][-1]
    assert all(math.isfinite(last[k]) for k in ("cd_loss", "E_pos", "E_neg", "energy_margin"))


H100_PCD = ("model.n_layer=8 model.n_head=8 model.n_embd=512 model.refine_steps=6 "
            "model.dropout=0.2 model.use_contrastive=true model.contrastive_type=pcd model.contrastive_k=10 "
            "model.contrastive_weight=0.15 model.n_persistent=500 data.batch_size=128 "
            "data.block_size=256 train.max_steps=10000 train.learning_rate=6e-4 train.compile=true "
            "wandb_project=nanoebm wandb_name=h100_8L_512d_pcd10_shakespeare")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pcd", "fast_pcd"])
def test_long_run_command_with_compile_runs_from_the_shell(kind, tmp_path):
    """The users' long H100 PCD command (legacy refine_steps, train.compile=true, W&B) through
    the real CLI with small sizes appended; fast_pcd must survive torch.compile as well."""
    cmd = H100_PCD.replace("contrastive_type=pcd", f"contrastive_type={kind}")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "train.py", *shlex.split(cmd), *SMALL,
                        "train.save_interval=0", f"out_dir={tmp_path}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "legacy option model.refine_steps=6 -> model.think_steps=6" in r.stdout
    assert "done: 2 steps" in r.stdout and " cd " in r.stdout  # contrastive metrics on the console
    ck = torch.load(tmp_path / "final.pt", weights_only=True)
    state = ck["shaping"][0]
    assert state["z"].shape == ((500 if kind == "pcd" else 20), 16, 65)
    if kind == "fast_pcd":
        assert any(f.abs().sum() > 0 for f in state["fast"].values())
