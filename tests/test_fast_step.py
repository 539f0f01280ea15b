"""The cheap training step computes the same thing as the straightforward one.

forward_backward, the training step, runs ebt_loss_stepwise(..., backward_scale=s) wherever it
applies (every recipe here but detach_refine=False): it backpropagates each think step as soon
as it is built and sends the gradients collected at the keys/values through the context stream
once. Checked here against ebt_loss(...).backward() on the full graph: same loss, same
gradient for every parameter; the autograd memory held at the peak does not grow with
think_steps; the context stream is backpropagated exactly once per batch.

    uv run pytest tests/test_fast_step.py
"""
import random

import pytest
import torch

from nanoebm.memory import SavedBytes
from nanoebm.losses import ebt_loss, ebt_loss_stepwise, forward_backward
from nanoebm.model import EBT
from tests.conftest import lifted_model

B, T, V = 3, 8, 11


def make_model(**kw) -> EBT:
    return lifted_model(V, **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def run(m: EBT, stepwise: bool):
    """Loss and every gradient for one batch, same RNG state for both paths."""
    m.zero_grad(set_to_none=True)
    x, y = batch()
    torch.manual_seed(7)
    random.seed(7)
    if stepwise:
        loss, _ = forward_backward(m, x, y, scale=1.0)  # ebt_loss_stepwise where it applies
    else:
        loss, _ = ebt_loss(m, x, y)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


RECIPES = [dict(), dict(truncate_refine=True), dict(think_prox_weight=0.5), dict(think_neutral=True),
           dict(think_init="noise", think_grad="probs", aux_ce_weight=0.0),
           dict(think_noise=0.3, think_lr_random_scale=2.0, step_embed=True),
           dict(think_steps_random=1), dict(detach_refine=False)]


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("kw", RECIPES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_stepwise_backward_matches_full_graph(K, kw):
    m = make_model(think_steps=K, **kw)
    l_full, g_full = run(m, stepwise=False)
    l_fast, g_fast = run(m, stepwise=True)
    assert torch.allclose(l_full, l_fast, rtol=1e-10, atol=1e-12)
    assert g_full.keys() == g_fast.keys() and len(g_full) > 10
    for n in g_full:
        assert torch.allclose(g_full[n], g_fast[n], rtol=1e-8, atol=1e-12), n
    assert m.alpha.grad is not None or not m.alpha.requires_grad  # alpha is trained too


def peak_saved(K: int, stepwise: bool) -> int:
    m = make_model(think_steps=K).float()
    x, y = batch()
    sb = SavedBytes(m.parameters())  # bench.py's measure: saved storages, params excluded
    with torch.autograd.graph.saved_tensors_hooks(sb.pack, sb.unpack):
        if stepwise:
            ebt_loss_stepwise(m, x, y, backward_scale=1.0)
        else:
            ebt_loss(m, x, y)[0].backward()
    return sb.peak


def test_peak_autograd_memory_does_not_grow_with_think_steps_when_detaching():
    fast = {K: peak_saved(K, True) for K in (1, 2, 4)}
    full = {K: peak_saved(K, False) for K in (1, 2, 4)}
    assert fast[4] <= 1.05 * fast[2] and fast[2] <= 1.05 * fast[1]  # flat in K
    assert full[4] > 1.4 * full[2] and full[2] > 1.2 * full[1]  # the straightforward graph grows
    assert fast[4] < full[4] / 2


def test_context_stream_is_backpropagated_once_per_batch():
    m = make_model(think_steps=3)
    x, y = batch()
    calls = []
    m.wte.weight.register_hook(lambda g: calls.append(1))  # only the context stream reads wte
    ebt_loss_stepwise(m, x, y, backward_scale=1.0)
    assert len(calls) == 1
    assert m.blocks[0].attn.qkv.weight.grad is not None


def test_contrastive_and_eval_fall_back_to_one_backward():
    from nanoebm.shaping import EnergyShaping
    m = make_model(think_steps=2, use_contrastive=True)
    sh = EnergyShaping(m.cfg, m)
    x, y = batch()
    loss, _ = forward_backward(m, x, y, shaping=sh, scale=1.0)
    assert not loss.requires_grad and m.energy_head.weight.grad is not None
