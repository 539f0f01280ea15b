"""The start probes (lab/startprobe.py) measure what they say: entropy and CE of each probe
chain, the S1-vs-noise distance, and the sign of the sharpness response on landscapes whose
answer is known.

    uv run pytest tests/lab/test_startprobe.py
"""
import json

import pytest
import torch

from lab.evaluate import evaluate
from lab.config import EvalConfig
from nanoebm.losses import position_curve
from nanoebm.model import EBT
from lab.startprobe import start_probes
from nanoebm.think import entropy
from tests.conftest import tiny_cfg

V = 11


def model_and_windows(**kw):
    torch.manual_seed(0)
    m = EBT(tiny_cfg(vocab_size=V, **kw)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (5, 8), generator=g), torch.randint(0, V, (5, 8), generator=g)
    return m, x, y, torch.ones(5, 8, dtype=torch.bool)


def test_probe_numbers_match_direct_computations():
    m, x, y, mask = model_and_windows()
    p = start_probes(m, x, y, mask, 3, batch_size=2)
    ref = position_curve(m, x, y, 3)  # the evaluator's chain from S1, no noise
    s1 = p["sharpness"]["s=1"]
    assert s1["ce"][0] == pytest.approx(ref["ce_k"][..., 0].mean().item(), rel=1e-5)
    assert s1["ce"][1] == pytest.approx(ref["ce_k"][..., 3].mean().item(), rel=1e-5)
    ctx = m.context(x)
    h2 = entropy(torch.softmax(2 * ctx.s1_logits, -1)).mean().item()
    assert p["sharpness"]["s=2"]["entropy"][0] == pytest.approx(h2, rel=1e-5)
    assert 0 <= p["path_independence"]["tv_s1_vs_noise"] <= 1


@pytest.mark.parametrize("sign", [+1, -1])
def test_sharpness_response_follows_the_landscape(monkeypatch, sign):
    """E = +H(p) is a pure sharpening landscape: descent lowers the entropy from every start;
    E = -H(p) raises it from every start (small steps, no pull back to the start)."""
    m, x, y, mask = model_and_windows(think_lr=0.3, think_prox_weight=0.0)
    monkeypatch.setattr(m, "energy", lambda ctx, p, **kw: sign * entropy(p))
    p = start_probes(m, x, y, mask, 2)
    for r in p["sharpness"].values():
        h0, h1 = r["entropy"]
        assert (h1 < h0) if sign > 0 else (h1 > h0)


def test_a_landscape_with_its_minimum_at_s1_calibrates(monkeypatch):
    """E = KL(p || p_S1) has its minimum at the System-1 answer: descent sharpens the flat start
    (entropy falls from s = 0.5) and flattens the sharp one (rises from s = 2): the "− / +"
    signature of a calibrating landscape, against the "− / −" of pure sharpening."""
    m, x, y, mask = model_and_windows(think_lr=0.3, think_prox_weight=0.0)
    kl = lambda ctx, p, **kw: (p * (p.clamp_min(1e-20).log() - torch.log_softmax(ctx.s1_logits, -1))).sum(-1)  # noqa: E731
    monkeypatch.setattr(m, "energy", kl)
    p = start_probes(m, x, y, mask, 2)
    dh = {s: r["entropy"][1] - r["entropy"][0] for s, r in p["sharpness"].items()}
    assert dh["s=0.5"] < -1e-3 and dh["s=2"] > 1e-3 and abs(dh["s=1"]) < 1e-5


def test_evaluate_writes_the_probes(trained_ckpt, tmp_path):
    evaluate(EvalConfig(checkpoint=str(trained_ckpt), sets=["val"], windows=8, bon=0, controls=False,
                        steps=2, probes=True, out_dir=str(tmp_path)))
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["probes"]["set"] == "val" and set(res["probes"]["sharpness"]) == {"s=0.5", "s=1", "s=2"}
    assert "path independence" in (tmp_path / "eval.md").read_text()
