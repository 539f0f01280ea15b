"""lab.evaluate diagnose=true: each diagnostic against a brute-force recomputation on a 3-window
batch, and a BPE checkpoint scored on a parquet folder.

    uv run pytest tests/lab/test_diagnose.py
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab import diagnose as dg
from nanoebm.model import EBT
from lab.shift import EvalSet
from nanoebm.think import initial_logits, think
from tests.conftest import tiny_cfg


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = EBT(tiny_cfg(think_steps=2, think_prox_weight=0.0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (3, 8), generator=g), torch.randint(0, 11, (3, 8), generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.25
    es = EvalSet("t", x, y, mask)
    d = dg.collect(m, es, 2, batch_size=3, seed=0, device="cpu", topk=11)
    return m, es, d


def test_rerank_ce_matches_a_loop_over_the_vocabulary(setup):
    m, es, d = setup
    beta = 0.7
    s1, E, cands, y = d["rerank"][0]
    got = dg.rerank_ce(s1, E, cands, y, beta)
    with torch.no_grad():
        ctx = m.context(es.x)
        for b in range(3):
            for t in range(8):
                scores = []
                for v in range(11):  # the dense one-hot path of model.energy
                    p = F.one_hot(torch.full((3, 8), v), 11).float()
                    e = m.energy(ctx, p, step=2)[b, t]
                    scores.append(torch.log_softmax(ctx.s1_logits[b, t], -1)[v] - beta * e)
                want = -torch.log_softmax(torch.stack(scores), 0)[y[b, t]]
                assert abs(got[b, t].item() - want.item()) < 1e-5
    assert torch.allclose(dg.rerank_ce(s1, E, cands, y, 0.0), F.cross_entropy(
        s1.transpose(1, 2), y, reduction="none"), atol=1e-5)  # beta 0: S1 itself


def test_rerank_topk_keeps_the_rest_of_the_mass(setup):
    m, es, d = setup
    s1, E, cands, y = d["rerank"][0]
    ctx = m.context(es.x)
    with torch.no_grad():
        E3, c3 = dg.candidate_energies(m, ctx, s1, 3, step=2)  # top-3 of an 11-token vocabulary
    got = dg.rerank_ce(s1, E3, c3, y, 1.3)
    logp = torch.log_softmax(s1, -1)
    for b in range(3):
        for t in range(8):
            top = c3[b, t].tolist()
            pc = logp[b, t, top].exp()
            new = pc.sum() * torch.softmax(logp[b, t, top] - 1.3 * E3[b, t], 0)
            want = new[top.index(y[b, t])] if y[b, t] in top else logp[b, t, y[b, t]].exp()
            assert abs(got[b, t].item() + math.log(want.item())) < 1e-5
            assert torch.allclose(E3[b, t], E[b, t, top], atol=1e-5)  # tokens == one-hot energies


def test_spearman_and_geometry_brute_force(setup):
    m, es, d = setup
    a, b = torch.randn(50), torch.randn(50)
    ra = [sorted(a.tolist()).index(v) for v in a.tolist()]
    rb = [sorted(b.tolist()).index(v) for v in b.tolist()]
    assert abs(dg.spearman(a, b) - np.corrcoef(ra, rb)[0, 1]) < 1e-9
    ctx = m.context(es.x)
    z0 = initial_logits(m, ctx, 8)
    zs = [z0] + think(m, ctx, z0, 2, noise=0.0).logits
    b_, t_ = 1, 5
    grads = []
    for k, z in enumerate(zs):  # dE_t/dz_t at one position, by finite differences
        zz = z.detach().clone()
        gk = torch.zeros(11)
        for v in range(11):
            for sgn in (1, -1):
                zz2 = zz.clone()
                zz2[b_, t_, v] += sgn * 1e-3
                e = m.energy(ctx, torch.softmax(zz2, -1), step=k)[b_, t_].item()
                gk[v] += sgn * e / 2e-3
        grads.append(gk)
    want_cos = F.cosine_similarity(grads[0], grads[1], 0).item()
    assert abs(d["grad_cos"][b_, t_, 0].item() - want_cos) < 1e-3
    move = (zs[1] - zs[0])[b_, t_]
    u = zs[0][b_, t_] - zs[0][b_, t_].mean()
    mv = move - move.mean()
    assert abs(d["sharpen"][b_, t_, 0].item() - (mv @ u / (mv.norm() * u.norm())).item()) < 1e-5


def test_summary_harm_split_and_temperature(setup):
    m, es, d = setup
    res = dg.summarise(d, es.mask, es, 2, None)
    delta = d["ceK"] - d["ce0"]
    right = d["s1_right"].bool() & es.mask
    assert abs(res["harm"]["s1_right"]["delta"] - delta[right].mean().item()) < 1e-6
    assert res["harm"]["s1_right"]["n"] + res["harm"]["s1_wrong"]["n"] == int(es.mask.sum())
    assert sum(q["n"] for q in res["harm"]["entropy_quintiles"]) >= int(es.mask.sum())
    ctx = m.context(es.x)
    z0 = initial_logits(m, ctx, 8)
    zs = [z0] + think(m, ctx, z0, 2, noise=0.0).logits
    fit, hold = es.mask.clone(), es.mask.clone()
    fit[1] = False  # windows 0 and 2 fit the temperature, window 1 is held out
    hold[[0, 2]] = False
    for k, z in enumerate(zs):
        best = min(dg.TEMPS.tolist(), key=lambda T: F.cross_entropy(
            (z / T).transpose(1, 2), es.y, reduction="none")[fit].sum().item())
        ce_t = F.cross_entropy((z / best).transpose(1, 2), es.y, reduction="none")[hold].mean().item()
        assert abs(res["temperature"]["T_k"][k] - best) < 1e-6
        assert abs(res["temperature"]["ce_tuned"][k] - ce_t) < 1e-5


def test_word_flags():
    in_word, novel = dg.word_flags("the kyng, 3 x", {"the", "x"})
    assert in_word.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert novel.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]


def test_bpe_checkpoint_on_a_parquet_folder(tmp_path):
    from lab import evaluate as ev
    from lab.config import EvalConfig
    from tests.conftest import compose
    from tests.test_data_bpe import TEXT, train_ranks, write_ranks, write_shards
    from train import train
    rank_file = write_ranks(tmp_path / "small.tiktoken", train_ranks(TEXT[:5000], 20))
    write_shards(tmp_path / "fw", 3, docs=12)
    run = train(compose(f"data.data_path={tmp_path / 'fw'}", "data.tokenizer=gpt2",
                        f"data.bpe_encoding={rank_file}", f"out_dir={tmp_path / 'out'}",
                        "train.max_steps=3", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                        "data.block_size=16", "data.batch_size=2", "train.eval_iters=1"))["run_dir"]
    write_shards(tmp_path / "other", 1, docs=5, seed=9)
    res = ev.evaluate(EvalConfig(checkpoint=str(run / "final.pt"), sets=["val", "lower"], controls=False,
                                 texts=[str(tmp_path / "other")], windows=6, bootstrap=20,
                                 diagnose=True, rerank_topk=8, device="cpu",
                                 out_dir=str(tmp_path / "ev")))
    assert res["bits_name"] == "bpt" and set(res["sets"]) == {"val", "other"}
    assert any("lower: skipped" in n for n in res["notes"])
    assert res["diagnose"]["other"]["rerank"]["candidates"] == 8
    assert (tmp_path / "ev" / "diagnose.md").read_text().startswith("## val")
