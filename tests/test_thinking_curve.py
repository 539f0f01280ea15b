"""The thinking-curve evaluator: paired across k, k=0 equals the initial candidate's loss, and
each k equals a separate k-step chain from the same start.

    uv run pytest tests/test_thinking_curve.py
"""
import math

import torch

from nanoebm.losses import curve_metrics, thinking_curve
from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think
from tests.conftest import tiny_cfg


def setup(**kw):
    torch.manual_seed(0)
    m = EBT(tiny_cfg(think_steps=2, **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 11, (2, 8), generator=g), torch.randint(0, 11, (2, 8), generator=g))
               for _ in range(3)]
    return m, batches


def direct_curve(m, batches, steps, seed):
    """Reference: a fresh k-step chain per k, each from the same per-batch start."""
    out = []
    for k in range(steps + 1):
        tot = 0.0
        for i, (x, y) in enumerate(batches):
            gen = torch.Generator().manual_seed(seed + i)
            ctx = m.context(x)
            z0 = initial_logits(m, ctx, x.shape[1], generator=gen)
            tot += ce(think(m, ctx, z0, k, noise=0.0, generator=gen).final, y).item() / len(batches)
        out.append(tot)
    return out


def test_noise_start_curve_is_paired_and_matches_separate_chains():
    m, batches = setup(think_init="noise")
    m.eval()
    c1 = thinking_curve(m, batches, 3, seed=5)
    c2 = thinking_curve(m, batches, 3, seed=5)
    assert c1 == c2  # same batches, same noise: deterministic
    ref = direct_curve(m, batches, 3, seed=5)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(c1["loss_k"], ref))
    # a different noise seed gives a different k=0 (so the pairing is real, not a constant)
    assert thinking_curve(m, batches, 3, seed=6)["loss_k"][0] != c1["loss_k"][0]


def test_s1_start_k0_equals_s1_loss_and_metrics_keys():
    m, batches = setup(think_init="s1")
    c = thinking_curve(m, batches, 2)
    direct = sum(ce(m.context(x).s1_logits, y).item() for x, y in batches) / len(batches)
    assert math.isclose(c["loss_k"][0], direct, rel_tol=1e-6)
    assert math.isclose(c["loss_s1"], direct, rel_tol=1e-6)
    mets = curve_metrics(c, "bpb")
    assert mets["val_loss"] == c["loss_k"][2] and mets["val_loss_k0"] == c["loss_k"][0]
    assert math.isclose(mets["val_bpb_k1"], c["loss_k"][1] / math.log(2))
    assert len(c["energy_k"]) == 3


def test_baseline_curve_is_the_s1_loss():
    m, batches = setup()
    m0 = EBT(tiny_cfg(think_steps=0))
    m0.load_state_dict(m.state_dict(), strict=False)
    c = thinking_curve(m0, batches, 0)
    assert len(c["loss_k"]) == 1 and math.isclose(c["loss_k"][0], c["loss_s1"], rel_tol=1e-6)
    assert c["energy_k"] == []
