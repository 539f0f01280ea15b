"""think_neutral: every think step loses its component along u = base - mean_V(base), so it cannot
just rescale (sharpen or flatten) the logits. Checked on think.py's steps for every think_grad,
on a constructed pure-sharpening energy, in generation (think_at.py) against think.py, in
training, and through evaluate.py's and sample.py's overrides of a checkpoint.

    uv run pytest tests/test_think_neutral.py
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lab import evaluate as ev
import sample as sample_mod
import train as train_mod
from lab import scorecard
from lab.config import EvalConfig
from sample import SampleConfig
from nanoebm.losses import ebt_loss
from nanoebm.model import EBT
from nanoebm.think import think, without_sharpening
from nanoebm.think_at import Thinker, position
from tests.conftest import SMALL, compose, tiny_cfg

V = 11


def model(**kw):
    torch.manual_seed(0)
    m = EBT(tiny_cfg(think_steps=3, **kw)).eval()
    with torch.no_grad():  # sharper than the 0.02 init: steps that really re-rank
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return m.requires_grad_(False)


def start(m, B=2, T=8, seed=1):
    x = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))
    ctx = m.context(x)
    return ctx, ctx.s1_logits


def centred(t):
    return t - t.mean(-1, keepdim=True)


def cosine(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_without_sharpening_removes_exactly_the_scaling_part():
    g = torch.Generator().manual_seed(0)
    base, move = torch.randn(3, 4, V, generator=g), torch.randn(3, 4, V, generator=g)
    out = without_sharpening(move, base)
    assert cosine(out, centred(base)).abs().max() < 1e-6
    # what was removed is a multiple of u per position; the rest of the move is untouched
    torch.testing.assert_close(without_sharpening(out + 2.5 * centred(base), base), out)
    torch.testing.assert_close(without_sharpening(move + 7.0, base), out + 7.0)  # a shift stays
    flat = torch.zeros(1, 1, V)  # all logits equal: no sharpening direction, nothing removed
    assert torch.equal(without_sharpening(move[:1, :1], flat), move[:1, :1])


@pytest.mark.parametrize("kw", [dict(), dict(think_grad="logits"), dict(think_grad="probs"),
                                dict(think_max_move=0.05), dict(accept_lower_energy=True)],
                         ids=lambda kw: ",".join(kw) or "hybrid")
def test_every_step_is_orthogonal_to_the_sharpening_direction(kw):
    accept = kw.pop("accept_lower_energy", False)
    on, off = model(think_neutral=True, **kw), model(**kw)
    ctx, z0 = start(on)
    run = lambda m: think(m, ctx, z0, 3, noise=0.0, accept_lower_energy=accept)  # noqa: E731
    out_on, out_off = run(on), run(off)
    probs = kw.get("think_grad") == "probs"
    for z, z_next in zip([z0] + out_on.logits, out_on.logits):
        base = z.softmax(-1) if probs else z  # the step's base: p for think_grad=probs
        move = z_next - base
        moved = move.norm(dim=-1) > 1e-6  # accept_lower_energy may keep z where E rose
        assert moved.float().mean() > 0.3
        assert cosine(move, centred(base))[moved].abs().max() < 1e-4
    # the unconstrained steps did have a sharpening part, and removing it changes predictions
    move_off = out_off.logits[0] - (z0.softmax(-1) if probs else z0)
    assert cosine(move_off, centred(z0.softmax(-1) if probs else z0)).abs().max() > 0.05
    assert (out_on.final.softmax(-1) - out_off.final.softmax(-1)).abs().max() > 0.02
    if not kw:  # the default recipe: some position's prediction (argmax) changes too
        assert (out_on.final.argmax(-1) != out_off.final.argmax(-1)).any()


def test_a_pure_sharpening_step_is_removed():
    """An energy that prefers the current ranking, E(p) = -sum_v p_v (z0_v - mean z0): its
    hybrid step z + alpha * u only sharpens z0 (argmax kept). Neutral, nothing is left of it."""
    for neutral in (False, True):
        m = model(think_neutral=neutral)
        ctx, z0 = start(m)
        u = centred(z0)
        m.energy = lambda ctx, p, step=0, **kw: -(p * u).sum(-1)  # (B, T)
        out = think(m, ctx, z0, 3, noise=0.0)
        assert torch.equal(out.final.argmax(-1), z0.argmax(-1))
        sharpened = out.final.softmax(-1).amax(-1) - z0.softmax(-1).amax(-1)  # (B, T)
        if neutral:
            torch.testing.assert_close(out.final, z0, rtol=0, atol=1e-5)
        else:
            assert sharpened.min() > 0.01


@pytest.mark.parametrize("kw", [dict(), dict(think_grad="probs"), dict(think_grad="logits"),
                                dict(think_max_move=0.05, step_adaln=True)],
                         ids=lambda kw: ",".join(kw) or "hybrid")
@pytest.mark.parametrize("accept", [False, True])
def test_generation_gives_what_think_gives(kw, accept):
    m = model(think_neutral=True, **kw).double()
    if m.adaln is not None:
        m.adaln.normal_(0.0, 0.3)
    ctx, z0 = start(m)
    z0 = z0[:, -1:]  # (B, 1, V): generation thinks about the last position
    ref = think(m, ctx, z0, 3, noise=0.3, accept_lower_energy=accept, final_energy=True,
                generator=torch.Generator().manual_seed(5))
    got = Thinker(m).think(position(m, ctx.kv, ctx.length), z0, 3, noise=0.3,
                           accept_lower_energy=accept, final_energy=True,
                           generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.final_energy, ref.final_energy, rtol=0, atol=1e-10)
    off = think(model(**kw).double(), ctx, z0, 3, noise=0.3, generator=torch.Generator().manual_seed(5))
    assert (off.final - ref.final).abs().max() > 1e-3  # the option changed these steps


def test_training_with_it():
    on, off = model(think_neutral=True).train(), model().train()
    x = torch.randint(V, (2, 8), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (on, off):
        m.requires_grad_(True)
        torch.manual_seed(7)
        loss, _ = ebt_loss(m, x, x.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) > 1e-5 and on.w_cand.grad.abs().max() > 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("neutral")
    return Path(train_mod.train(compose(*SMALL, f"out_dir={out}"))["run_dir"]) / "final.pt"


def test_evaluate_and_sample_override_reaches_the_model(ckpt, tmp_path, monkeypatch, capsys):
    # sharpening-neutral steps are the inference default; think_neutral=false restores plain ones
    assert compose("think_neutral=false", config_name="evaluate").think_neutral is False
    assert compose(config_name="sample").think_neutral is True
    assert compose(config_name="evaluate").think_neutral is True and compose(config_name="viz").think_neutral
    seen = []
    real = scorecard.score_windows
    monkeypatch.setattr(scorecard, "score_windows",
                        lambda m, *a, **kw: seen.append(m.cfg.think_neutral) or real(m, *a, **kw))
    res = {}
    for neutral in (False, True):
        cfg = EvalConfig(checkpoint=str(ckpt), out_dir=str(tmp_path / str(neutral)), sets=["val"],
                         windows=8, bootstrap=20, bon=1, device="cpu", think_neutral=neutral,
                         controls=False)
        res[neutral] = ev.evaluate(cfg)["sets"]["val"]["ce_k"]
    assert seen == [False, True]
    assert json.loads((tmp_path / "True" / "eval.json").read_text())["think_neutral"] is True
    assert res[True][0] == res[False][0] and res[True][-1] != res[False][-1]  # same start, other steps
    got = []
    real_gen = sample_mod.generate
    monkeypatch.setattr(sample_mod, "generate", lambda m, *a, **kw: got.append(m.cfg.think_neutral)
                        or real_gen(m, *a, **kw))
    sample_mod.sample(SampleConfig(checkpoint=str(ckpt), max_new_tokens=3, think_neutral=True,
                                   device="cpu", stream=False))
    assert got == [True] and "sharpening-neutral steps" in capsys.readouterr().out
    # an override to false turns off what a checkpoint was trained with
    ck = torch.load(ckpt, weights_only=True)
    ck["model_config"]["think_neutral"] = True
    from nanoebm.checkpoint import model_from_checkpoint
    assert model_from_checkpoint(ck).cfg.think_neutral
    assert not model_from_checkpoint(ck, think_neutral=False).cfg.think_neutral
    assert dataclasses.replace(model_from_checkpoint(ck).cfg, think_neutral=False) == \
        model_from_checkpoint(ck, think_neutral=False).cfg
