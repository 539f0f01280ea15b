"""The controls beside thinking (lab/controls.py): the fitted temperature is the CE minimiser of
its half and scores the other half, entropy matching hits its target, dynamic evaluation scores
before it learns, and the report names every method for every set.

    uv run pytest tests/lab/test_controls.py
"""
import json
import math
from pathlib import Path

import pytest
import torch

import train as train_mod
from lab import controls as C
from lab.config import EvalConfig
from lab.shift import EvalSet
from nanoebm.checkpoint import load_checkpoint, model_from_checkpoint
from nanoebm.losses import ce
from tests.conftest import SMALL, compose


def random_logits(seed=0, b=8, T=6, V=11, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, T, V, generator=g) * scale
    y = torch.randint(V, (b, T), generator=g)
    return z, y, torch.ones(b, T)


def test_fitted_temperature_is_the_ce_minimiser_of_its_half_and_scores_the_other():
    z, y, m = random_logits()
    sums, _ = C.temp_sums(z, y, m)  # (b, G)
    held, temps = C.two_fold(sums, m.sum(1))
    fine = torch.logspace(math.log10(0.2), math.log10(5.0), 4001)
    for half, t_fit in zip((slice(0, None, 2), slice(1, None, 2)), temps):
        ce_at = lambda t: ce(z[half] / t, y[half]).item()  # noqa: E731
        best = min(fine.tolist(), key=ce_at)
        assert abs(math.log(t_fit / best)) < 0.015  # within one grid step of the true minimiser
        assert ce_at(t_fit) - ce_at(best) < 1e-4
    # each half is scored at the other half's temperature: the odd windows at T from the even
    assert torch.allclose(held[1::2], (ce(z[1::2] / temps[0], y[1::2], "none").view(4, 6)).sum(1),
                          atol=1e-5)
    assert torch.allclose(held[0::2], (ce(z[0::2] / temps[1], y[0::2], "none").view(4, 6)).sum(1),
                          atol=1e-5)


def test_entropy_matching_hits_the_target_entropy():
    z, y, m = random_logits(seed=1)
    sums, hs = C.temp_sums(z, y, m)
    for target in (0.8, 1.5, 2.1):
        _, t = C.at_entropy(sums, hs, m.sum(1), target)
        p = torch.softmax(z / t, -1)
        h = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
        assert abs(h - target) < 1e-3, (target, t, h)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    run = lambda *o: train_mod.train(compose(*SMALL, "train.max_steps=8", "train.learning_rate=3e-3",  # noqa: E731
                                             *o, f"out_dir={root / o[0][-1] if o else root / 'e'}"))
    ebt = Path(run()["run_dir"]) / "final.pt"
    base = Path(run("model.think_steps=0")["run_dir"]) / "final.pt"
    return {"ebt": ebt, "base": base}


def windows(n=6, T=16, V=65, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (n, T), generator=g)
    return EvalSet("w", x, torch.roll(x, -1, 1), torch.ones(n, T, dtype=torch.bool))


def test_dynamic_evaluation_scores_first_and_resets(tiny):
    model = model_from_checkpoint(load_checkpoint(tiny["ebt"])).eval()
    before = [p.detach().clone() for p in model.parameters()]
    es, kw = windows(), dict(batch_size=2, seed=0, device="cpu")
    static = C.dynamic_eval(model, es, 2, steps=0, lr=0.1, **kw)  # no steps: the static scores
    with torch.no_grad():
        ctx = model.context(es.x)
        assert torch.equal(static["s1"], ce(ctx.s1_logits, es.y, "none").view(6, 16).sum(1))
    a = C.dynamic_eval(model, es, 2, steps=1, lr=0.5, **kw)
    assert torch.equal(a["s1"][:2], static["s1"][:2]) and not torch.equal(a["s1"][2:], static["s1"][2:])
    x2 = es.x.clone()
    x2[2, :8] = (x2[2, :8] + 1) % 65  # perturb window 2 (the second batch): only later windows move
    b = C.dynamic_eval(model, EvalSet("w", x2, es.y, es.mask), 2, steps=1, lr=0.5, **kw)
    assert torch.equal(b["s1"][:2], a["s1"][:2]) and torch.equal(b["s1"][3], a["s1"][3])
    assert not torch.equal(b["s1"][4:], a["s1"][4:])
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the copy adapted
    assert torch.equal(C.dynamic_eval(model, es, 2, steps=1, lr=0.5, **kw)["think"], a["think"])


@pytest.mark.slow  # lab.evaluate end to end: curve, best-of-N, every control
def test_report_has_every_method_for_every_set(tiny, tmp_path):
    from lab import evaluate as ev
    res = ev.evaluate(EvalConfig(checkpoint=str(tiny["ebt"]), baseline=str(tiny["base"]),
                                 sets=["val", "corrupt_20"], windows=8, batch_size=4, bootstrap=20,
                                 steps=2, device="cpu", out_dir=str(tmp_path)))
    keys = ["s1", "s1_temperature", "s1_entropy_matched", "think_temperature", "T_s1", "tt",
            "s1_entropy_matched_plain", "s1_entropy_matched_neutral",
            "think_temperature_plain", "think_temperature_neutral", "tt_baseline", "tt_s1",
            "tt_think", "gain_beyond_s1_temperature_neutral", "gain_beyond_tt_s1_plain"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    for name in ("val", "corrupt_20"):
        assert all(k in saved["sets"][name]["controls"] for k in keys), name
    md = (tmp_path / "eval.md").read_text()
    for name in ("val", "corrupt_20"):
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) == 2  # both tables
    assert "tt + thinking" in md and "Forward passes per token" in md and "ebt lr " in md
    assert res["controls"]["tt"]["ebt"]["lr"] in C.TT_GRID["lr"]
    assert (tmp_path / "controls.png").stat().st_size > 5000


def test_bad_dynamic_evaluation_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="tt_steps=40 must be in 0..16"):
        EvalConfig(tt_lr=1e-3, tt_steps=40)
    with pytest.raises(ValueError, match="give tt_lr and tt_steps together"):
        EvalConfig(tt_lr=1e-3)
    with pytest.raises(ValueError, match="tt_lr=0.0 must be > 0"):
        EvalConfig(tt_lr=0.0, tt_steps=1)
