"""Thinking: every thinking option changes the computation, the second-order path trains the
network, the context stream runs once per step, and a trained model's thinking descends energy.

    uv run pytest tests/test_think.py
"""
import pytest
import torch

from nanoebm.checkpoint import load_checkpoint, model_from_checkpoint
from nanoebm.data import load_data
from nanoebm.config import DataConfig
from nanoebm.losses import ebt_loss
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think
from tests.conftest import tiny_cfg

B, T, V = 3, 8, 11


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def loss_and_grads(seed=0, **kw):
    """Training loss and every parameter gradient for one fixed batch and RNG state."""
    torch.manual_seed(seed)
    m = EBT(tiny_cfg(**kw))
    with torch.no_grad():  # lift the near-zero init so every path carries signal
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.1 * torch.randn_like(p))
    m.train()
    x, y = batch()
    torch.manual_seed(123)
    import random
    random.seed(123)
    loss, _ = ebt_loss(m, x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), grads


BASE = dict(think_steps=2, think_init="noise", think_grad="probs", think_lr=2.0, aux_ce_weight=0.0,
            think_noise=0.0, think_lr_random_scale=1.0, think_prox_weight=0.0)  # plain steps
OPTIONS = [  # (option overrides) -> must change the loss or the gradients vs BASE
    dict(think_steps=3), dict(think_lr=3.0), dict(think_grad="logits"), dict(think_grad="hybrid"),
    dict(think_init="s1"), dict(think_init="zeros"), dict(think_init_std=2.0),
    dict(detach_refine=False), dict(truncate_refine=True), dict(think_max_move=0.05),
    dict(think_noise=0.5), dict(softmax_temperature=0.5), dict(entropy_weight=0.5),
    dict(mixture_stopgrad=True), dict(step_embed=True), dict(think_lr_random_scale=2.0),
    dict(aux_ce_weight=0.5), dict(think_prox_weight=0.5), dict(think_neutral=True),
]


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_think_option_changes_the_computation(opt):
    l0, g0 = loss_and_grads(**BASE)
    l1, g1 = loss_and_grads(**{**BASE, **opt})
    same_keys = g0.keys() & g1.keys()
    changed = (not torch.allclose(l0, l1)) or g0.keys() != g1.keys() or any(
        not torch.allclose(g0[k], g1[k]) for k in same_keys)
    assert changed


def test_think_steps_random_draws_k_to_k_plus_r_in_training_and_k_plus_r_in_eval():
    m = EBT(tiny_cfg(think_steps=1, think_steps_random=2)).train()
    x, y = batch()
    seen = set()
    for _ in range(30):
        _, met = ebt_loss(m, x, y, want_metrics=True)
        seen.add(max(int(k[4:]) for k in met if k.startswith("ce_k")))
    assert seen == {1, 2, 3}
    m.eval()
    _, met = ebt_loss(m, x, y, want_metrics=True)
    assert max(int(k[4:]) for k in met if k.startswith("ce_k")) == 3


def test_detach_refine_false_with_s1_start_trains_s1_head_through_thinking():
    # with detach_refine=false the think loss reaches the S1 head through z_0; with the default
    # detach (and no aux CE) it cannot
    _, g_attached = loss_and_grads(**{**BASE, "think_init": "s1", "detach_refine": False})
    _, g_detached = loss_and_grads(**{**BASE, "think_init": "s1"})
    assert g_attached["s1_head.weight"].abs().max() > 0
    assert "s1_head.weight" not in g_detached or g_detached["s1_head.weight"].abs().max() == 0


def test_mixture_stopgrad_cuts_second_order_path_into_w_cand():
    _, g = loss_and_grads(**{**BASE, "mixture_stopgrad": True})
    assert "w_cand" not in g or g["w_cand"].abs().max() == 0
    _, g = loss_and_grads(**BASE)
    assert g["w_cand"].abs().max() > 0


def test_think_lr_learnable_gives_alpha_a_gradient():
    _, g = loss_and_grads(**{**BASE, "think_lr_learnable": True})
    assert g["alpha"].abs() > 0
    _, g = loss_and_grads(**{**BASE, "think_lr_learnable": False})
    assert "alpha" not in g


def test_create_graph_is_what_trains_the_network():
    """Noise start, no aux CE: every transformer gradient comes through dE/dp. Forgetting
    create_graph (as earlier repos did) leaves the network with no gradient at all."""
    torch.manual_seed(0)
    m = EBT(tiny_cfg(**BASE)).train()
    x, y = batch()
    ctx = m.context(x)
    z0 = initial_logits(m, ctx, T)
    for create_graph, expect in ((True, True), (False, False)):
        m.zero_grad()
        out = think(m, m.context(x), z0, 2, create_graph=create_graph)
        loss = torch.nn.functional.cross_entropy(out.final.flatten(0, 1), y.flatten())
        if loss.requires_grad:
            loss.backward()
        got = [p.grad is not None and p.grad.abs().max() > 0
               for n, p in m.named_parameters() if n.startswith(("blocks", "wte", "w_cand", "energy"))]
        assert all(got) if expect else not any(got)


@pytest.mark.parametrize("K", [0, 1, 2, 4])
def test_context_stream_runs_once_per_training_step(K):
    m = EBT(tiny_cfg(think_steps=K)).train()
    calls = []
    orig = m.context
    m.context = lambda *a, **k: calls.append(1) or orig(*a, **k)
    x, y = batch()
    loss, _ = ebt_loss(m, x, y, want_metrics=True)
    loss.backward()
    assert len(calls) == 1


def test_think_steps_zero_is_exactly_the_causal_lm():
    m = EBT(tiny_cfg(think_steps=0)).eval()
    x, y = batch()
    loss, _ = ebt_loss(m, x, y)
    ref = torch.nn.functional.cross_entropy(m.context(x).s1_logits.flatten(0, 1), y.flatten())
    assert torch.equal(loss, ref)
    # no candidate-stream parameters are touched by the baseline's loss: it has none at all
    loss.backward()
    assert m.energy_head is None and m.w_cand is None and not m.alpha.requires_grad


@pytest.mark.slow
def test_trained_model_thinking_lowers_energy_and_changes_prediction(trained_ckpt):
    ckpt = load_checkpoint(trained_ckpt)
    m = model_from_checkpoint(ckpt).eval()
    data = load_data(DataConfig(block_size=32))
    x, y = data.get_batch("val", 8, 32, torch.Generator().manual_seed(0))
    ctx = m.context(x)
    z0 = initial_logits(m, ctx, 32)
    out = think(m, ctx, z0, 4, final_energy=True)
    energies = [e.mean().item() for e in out.energies] + [out.final_energy.mean().item()]
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    p0, p1 = z0.softmax(-1), out.logits[0].softmax(-1)
    assert (p1 - p0).abs().max() > 1e-2  # thinking moves the predicted distribution


def test_prox_weight_makes_long_chains_converge_instead_of_drifting():
    """z <- z - alpha*(dJ/dp + prox*(z - z0)): the pull toward z0 bounds the chain; without it
    a roughly constant energy gradient moves the logits further at every step."""
    def chain(prox):
        torch.manual_seed(0)
        m = EBT(tiny_cfg(think_steps=2, think_lr=0.5, think_prox_weight=prox)).eval()
        with torch.no_grad():
            m.energy_head.weight.mul_(5)  # a landscape with a real slope
        x, _ = batch()
        ctx = m.context(x)
        z0 = initial_logits(m, ctx, T)
        out = think(m, ctx, z0, 40, noise=0.0)
        return [(z - z0).norm().item() for z in out.logits]
    free, prox = chain(0.0), chain(1.0)
    assert free[-1] > 5 * free[4]                 # drifts on and on
    assert abs(prox[-1] - prox[-11]) < 0.01 * prox[-1] and prox[-1] < free[-1] / 5  # settled


@pytest.mark.slow
def test_default_recipe_think_step_lowers_ce_on_a_fixed_batch(trained_ckpt):
    """A few dozen steps of the default recipe: one think step from the S1 start lowers the CE
    of a fixed batch of training windows (directional: the step learned to help where it was
    trained; whether that carries to val is what lab/LOG.md records)."""
    from nanoebm.losses import ce
    m = model_from_checkpoint(load_checkpoint(trained_ckpt)).eval()
    data = load_data(DataConfig(block_size=32))
    x, y = data.get_batch("train", 32, 32, torch.Generator().manual_seed(0))
    ctx = m.context(x)
    z0 = initial_logits(m, ctx, 32)
    out = think(m, ctx, z0, m.cfg.think_steps)
    assert ce(out.logits[0], y).item() < ce(z0, y).item() - 1e-3
