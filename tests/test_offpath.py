"""Training the energy off the descent path (nanoebm/offpath.py): each option changes the loss or
the gradients, is inert at its off value, and computes what its docstring says.

    uv run pytest tests/test_offpath.py
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import train as train_mod
from nanoebm import offpath
from nanoebm.losses import ebt_loss, forward_backward
from nanoebm.model import EBT
from tests.conftest import SMALL, compose, lifted_model, tiny_cfg

B, T, V = 3, 8, 11
OPTIONS = [dict(think_start_scale=2.0, think_start_noise=0.5), dict(think_mixed_starts=0.5),
           dict(think_free_steps=2), dict(value_align_weight=1.0), dict(residual_nce_weight=1.0)]


def make_model(**kw) -> EBT:
    return lifted_model(V, **kw)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def loss_and_grads(m: EBT, x=None, y=None, split_b=None):
    m.zero_grad(set_to_none=True)
    x, y = batch() if x is None else (x, y)
    torch.manual_seed(7)
    random.seed(5)  # think_free_steps: n = 2 for this seed (checked below)
    loss, _ = forward_backward(m, x, y, split_b=split_b)
    return loss, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(o))
def test_each_option_changes_the_loss_and_is_off_by_default(opt):
    assert all(getattr(tiny_cfg(), k) != v for k, v in opt.items())  # off by default
    l0, g0 = loss_and_grads(make_model())
    l1, g1 = loss_and_grads(make_model(**opt))
    assert not torch.isclose(l0, l1) or any(not torch.allclose(g0[n], g1[n]) for n in g0)


def test_perturbed_start_is_two_sided_and_detached():
    z = torch.randn(4, 50, V, requires_grad=True)
    assert torch.equal(offpath.perturb_start(z, 1.0, 0.0), z.detach())  # s_max 1, sigma 0: z
    torch.manual_seed(0)
    s = (offpath.perturb_start(z, 2.0, 0.0) / z).detach()  # (4, 50, V): one s per position
    assert torch.allclose(s, s[..., :1].expand_as(s), atol=1e-5)
    s = s[..., 0]
    assert s.min() >= 0.5 - 1e-6 and s.max() <= 2 + 1e-6 and (s < 1).any() and (s > 1).any()
    assert not offpath.perturb_start(z, 2.0, 0.5).requires_grad


def test_perturbed_start_never_trains_s1_through_the_think_path():
    # aux_ce_weight=0 and no detach between steps: S1 could only learn through the think path
    common = dict(aux_ce_weight=0.0, detach_refine=False)
    _, g_plain = loss_and_grads(make_model(**common))
    _, g_h1 = loss_and_grads(make_model(think_start_scale=2.0, **common))
    assert g_plain["s1_head.weight"].abs().sum() > 0
    assert "s1_head.weight" not in g_h1 or g_h1["s1_head.weight"].abs().sum() == 0


def test_mixed_starts_replace_exactly_the_first_rows():
    m = make_model(think_mixed_starts=0.5)
    z = torch.randn(4, T, V, dtype=torch.double)
    out = offpath.mixed_starts(m, z, 0.5)
    assert torch.equal(out[2:], z[2:]) and not torch.allclose(out[:2], z[:2])


def test_free_steps_build_no_graph(monkeypatch):
    """The trained loss from n free steps equals the loss from their (detached) result used as
    z_0: the free steps add no parameter gradient. n_max=0 is the plain recipe."""
    random.seed(5)
    assert random.randint(0, 2) == 2  # the n loss_and_grads draws
    kw = dict(think_noise=0.0, think_lr_random_scale=1.0, think_loss="last")
    m = make_model(think_free_steps=2, **kw)
    starts = []
    real = offpath.free_steps
    monkeypatch.setattr(offpath, "free_steps", lambda *a: starts.append(real(*a)) or starts[-1])
    l_free, g_free = loss_and_grads(m)
    assert len(starts) == 1 and starts[0].grad_fn is None and not starts[0].requires_grad
    monkeypatch.setattr("nanoebm.losses.start_for_training", lambda model, ctx, z0: starts[0])
    l_ref, g_ref = loss_and_grads(make_model(**kw))
    assert torch.isclose(l_free, l_ref) and all(torch.allclose(g_free[n], g_ref[n]) for n in g_ref)


def direct_energies(m, x, cands):
    """E per position for candidate distributions (B, T, V), with the unfused attention."""
    ctx = m.context(x)
    return ctx, [m.energy(ctx, p, step=m.cfg.eval_think_steps) for p in cands]


def test_value_align_term_against_a_direct_computation():
    m = make_model(value_align_weight=1.0, value_align_tau=0.7).eval()
    x, y = torch.randint(0, V, (1, 2)), torch.randint(0, V, (1, 2))
    ctx = m.context(x)
    z_final = torch.randn(1, 2, V, dtype=torch.double)
    got = offpath.value_align_term(m, ctx, y, z_final, step=2)
    cands = [ctx.s1_logits / t for t in (1, 0.5, 0.7, 1.4, 2.0)] + [z_final]
    total = 0.0
    for t in range(2):  # per position: target weights from CE, the listwise CE of -E/tau
        E = [m.energy(ctx, torch.softmax(z, -1), step=2)[0, t].item() for z in cands]
        c = [-torch.log_softmax(z[0, t], -1)[y[0, t]].item() for z in cands]
        q = [math.exp(-ci / 0.7) for ci in c]
        q = [qi / sum(q) for qi in q]
        lse = math.log(sum(math.exp(-e / 0.7) for e in E))
        total += sum(qi * (lse + e / 0.7) for qi, e in zip(q, E))
    assert got.item() == pytest.approx(total / 2, rel=1e-9)


def test_residual_nce_term_against_a_direct_computation():
    k = 3
    m = make_model(residual_nce_weight=1.0, residual_nce_topk=k).eval()
    x, y = torch.randint(0, V, (1, 2)), torch.randint(0, V, (1, 2))
    ctx = m.context(x)
    got = offpath.residual_nce_term(m, ctx, y, step=2)
    total = 0.0
    for t in range(2):
        logp = torch.log_softmax(ctx.s1_logits[0, t], -1)
        others = [v for v in logp.argsort(descending=True).tolist() if v != y[0, t]][:k]
        s = []
        for v in others + [y[0, t].item()]:  # the target last
            onehot = F.one_hot(torch.tensor(v), V).double().expand(1, 2, V)
            s.append(logp[v].item() - m.energy(ctx, onehot, step=2)[0, t].item())
        total += math.log(sum(math.exp(si) for si in s)) - s[-1]
    assert got.item() == pytest.approx(total / 2, rel=1e-9)


def test_split_b_mask_marks_the_targets_of_every_nth_chunk():
    mask = offpath.split_b_mask(torch.tensor([0, 17]), 5, every=3, chunk=10)
    # targets 1..5 (chunk 0: A) and 18..22 (chunk 1: A for 18, 19; chunk 2: B for 20, 21, 22)
    assert mask.tolist() == [[False] * 5, [False, False, True, True, True]]


def test_crossfit_separates_the_s1_and_think_gradients():
    """S1 CE sees only split-A targets, the think loss only split-B targets: changing the
    targets of one split leaves the other split's gradients unchanged."""
    m = make_model(crossfit_every=2, think_noise=0.0, think_lr_random_scale=1.0)
    x, y = batch()
    split_b = torch.zeros(B, T, dtype=torch.bool)
    split_b[:, T // 2:] = True
    y_a, y_b = y.clone(), y.clone()
    y_a[~split_b] = (y[~split_b] + 1) % V  # new targets on A only
    y_b[split_b] = (y[split_b] + 1) % V    # new targets on B only
    _, g = loss_and_grads(m, x, y, split_b)
    _, g_a = loss_and_grads(m, x, y_a, split_b)
    _, g_b = loss_and_grads(m, x, y_b, split_b)
    assert torch.allclose(g["energy_head.weight"], g_a["energy_head.weight"])  # think: B only
    assert not torch.allclose(g["energy_head.weight"], g_b["energy_head.weight"])
    assert torch.allclose(g["s1_head.weight"], g_b["s1_head.weight"])  # S1 CE: A only
    assert not torch.allclose(g["s1_head.weight"], g_a["s1_head.weight"])


@pytest.mark.parametrize("opt", OPTIONS + [dict(residual_nce_weight=1.0, residual_nce_topk=3),
                                           dict(crossfit_every=2)], ids=lambda o: ",".join(o))
def test_fast_step_matches_the_full_graph(opt):
    m = make_model(**opt)
    x, y = batch()
    split_b = (torch.arange(T) % 2 == 0).expand(B, T) if "crossfit_every" in opt else None
    l_fast, g_fast = loss_and_grads(m, x, y, split_b)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    random.seed(5)
    loss, _ = ebt_loss(m, x, y, split_b=split_b)
    loss.backward()
    assert torch.isclose(l_fast, loss.detach())
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_fast[n], p.grad, atol=1e-10), n


@pytest.mark.parametrize("bad,msg", [(dict(think_start_scale=0.5), "s_max >= 1"),
                                     (dict(think_steps=0, value_align_weight=1.0), "think_steps > 0"),
                                     (dict(think_init="noise", think_mixed_starts=0.5), "think_init=s1"),
                                     (dict(crossfit_every=1), "crossfit_every")])
def test_bad_values_fail_with_the_fix(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(**bad)


def test_train_runs_with_every_option_and_logs_the_terms(tmp_path):
    cfg = compose(*SMALL, "model.crossfit_every=2", "model.crossfit_chunk=8",
                  "model.value_align_weight=1", "model.residual_nce_weight=1",
                  "model.think_start_scale=2", "model.think_free_steps=1", f"out_dir={tmp_path}")
    out = train_mod.train(cfg)
    rows = [r for r in map(__import__("json").loads,
                           (out["run_dir"] / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert rows and all(math.isfinite(r["value_align"]) and math.isfinite(r["residual_nce"])
                        for r in rows)
