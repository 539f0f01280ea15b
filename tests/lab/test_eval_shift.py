"""evaluate.py: any text scored like the training evaluator, the shift sets built as they claim,
paired intervals, the shift axis, bad input, and a BPE checkpoint on a parquet folder.

    uv run pytest tests/lab/test_eval_shift.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import evaluate as ev
from lab.scorecard import run_data
import train as train_mod
from nanoebm.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from lab.config import EvalConfig
from lab.scoring import paired_bootstrap, score_windows
from nanoebm.losses import thinking_curve
from lab.shift import corrupt_set, text_set
from nanoebm.tokenizer import tokenizer_from_meta
from tests.conftest import REPO, SMALL, compose

TEXT = (REPO / "shakespeare.txt").read_text()
RUN = [*SMALL, "train.max_steps=20", "data.batch_size=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny EBT and its plain-transformer baseline, 20 steps each, with sampler records."""
    root = tmp_path_factory.mktemp("evalruns")
    ebt = train_mod.train(compose(*RUN, f"out_dir={root / 'ebt'}"))["run_dir"] / "final.pt"
    base = train_mod.train(compose(*RUN, "model.think_steps=0", f"out_dir={root / 'base'}"))["run_dir"] / "final.pt"
    return {"ebt": Path(ebt), "base": Path(base), "root": root}


def cfg(runs, tmp_path, **kw):
    kw.setdefault("windows", 24)
    kw.setdefault("bootstrap", 200)
    kw.setdefault("controls", False)  # tests/lab/test_controls.py tests them
    return EvalConfig(checkpoint=str(runs["ebt"]), out_dir=str(tmp_path / "out"), device="cpu", **kw)


def test_text_file_scores_like_the_training_evaluator(runs, tmp_path):
    ck = load_checkpoint(runs["ebt"])
    model, tok = model_from_checkpoint(ck).eval(), tokenizer_from_meta(ck["meta"])
    f = tmp_path / "other.txt"
    f.write_text(TEXT[5000:9000])
    es = text_set(str(f), tok, 16, 24, drop_unknown=False)
    assert torch.equal(es.x[0], torch.tensor(tok.encode(TEXT[5000:5016])))
    r = score_windows(model, es.x, es.y, 3, trained_k=2, batch_size=8, seed=7)
    batches = [(es.x[i:i + 8], es.y[i:i + 8]) for i in range(0, 24, 8)]
    curve = thinking_curve(model, batches, 3, seed=7)  # what train.py logs as val_loss_k*
    assert np.allclose(r["ce_k"].mean((0, 1)).tolist(), curve["loss_k"], atol=1e-6)
    assert abs(r["ce_s1"].mean().item() - curve["loss_s1"]) < 1e-6
    res = ev.evaluate(cfg(runs, tmp_path, sets=[], texts=[str(f)], steps=3, batch_size=8, seed=7,
                          think_neutral=False))  # the plain steps train.py's curve above ran
    assert np.allclose(res["sets"]["other.txt"]["ce_k"], curve["loss_k"], atol=1e-6)
    out = Path(res["out_dir"])
    assert json.loads((out / "eval.json").read_text())["sets"]["other.txt"]["n_positions"] == 24 * 16
    assert "| other.txt |" in (out / "eval.md").read_text() and (out / "eval.png").stat().st_size > 1000


def test_unknown_characters_listed_or_dropped(runs, tmp_path):
    f = tmp_path / "odd.txt"
    f.write_text(TEXT[:3000].replace("e", "é").replace("a", "ä"))
    with pytest.raises(ValueError, match=r"2 characters outside.*'äé'.*drop_unknown=true"):
        ev.evaluate(cfg(runs, tmp_path, sets=[], texts=[str(f)]))
    tok = tokenizer_from_meta(load_checkpoint(runs["ebt"])["meta"])
    es = text_set(str(f), tok, 16, 10, drop_unknown=True)
    kept = TEXT[:3000].replace("e", "").replace("a", "")
    assert es.note == f"dropped {3000 - len(kept)} unknown characters"
    assert tok.decode(es.x[0].tolist() + es.y[0, -1:].tolist()) == kept[:17]


def sampled_targets(ck, n_train: int) -> np.ndarray:
    """Independent replay: the loop's draws, rebuilt from the run's seed with torch.randint."""
    seen = np.zeros(n_train, bool)
    segs = ck["sampler"]
    for i, seg in enumerate(segs):
        g = torch.Generator()
        g.set_state(seg["state"])
        stop = segs[i + 1]["start_step"] if i + 1 < len(segs) else ck["step"]
        for _ in range(stop - seg["start_step"]):
            for s in torch.randint(n_train - 17, (4,), generator=g).tolist():
                seen[s + 1:s + 17] = True
    return seen


@pytest.mark.parametrize("resumed", [False, True])
def test_seen_and_unseen_windows_are_what_they_claim(runs, tmp_path, resumed):
    path = runs["ebt"]
    if resumed:
        first = train_mod.train(compose(*RUN, "train.max_steps=10", "train.save_interval=5",
                                        f"out_dir={tmp_path / 'a'}"))["run_dir"]
        path = train_mod.train(compose(*RUN, f"load_checkpoint={first / 'ckpt_step_000005.pt'}",
                                       f"out_dir={tmp_path / 'b'}"))["run_dir"] / "final.pt"
    ck = load_checkpoint(path)
    assert torch.equal(ck["sampler"][0]["state"], torch.Generator().manual_seed(1337).get_state())
    n_train = int(len(TEXT) * 0.9)
    seen = sampled_targets(ck, n_train)
    res = ev.evaluate(EvalConfig(checkpoint=str(path), out_dir=str(tmp_path / "o"), device="cpu", controls=False,
                                 sets=["train_seen", "train_unseen"], windows=8, bootstrap=50))
    from lab.shift import builtin_sets
    data = run_data(ck, EvalConfig())
    tok = tokenizer_from_meta(ck["meta"])
    sets = {s.name: s for s in builtin_sets(["train_seen", "train_unseen"], data, ck, tok, 16, 8, 0)[0]}
    for name, want in (("train_seen", True), ("train_unseen", False)):
        s = sets[name]
        assert (seen[s.pos[s.mask.numpy()]] == want).all()
        assert torch.equal(s.y, torch.from_numpy(np.asarray(data.train)[s.pos].astype(np.int64)))
        assert res["sets"][name]["n_positions"] == int(s.mask.sum())
    assert sets["train_unseen"].mask.all() and sets["train_seen"].mask.all()  # whole windows
    # more windows than the ~80 sampled ones: scored on the seen positions of partial windows
    part = builtin_sets(["train_seen"], data, ck, tok, 16, 2000, 0)[0][0]
    assert "only" in part.note and not part.mask.all()
    assert seen[part.pos[part.mask.numpy()]].all() and not seen[part.pos[~part.mask.numpy()]].any()


def test_corruption_rate_and_scored_positions_are_clean():
    tok = tokenizer_from_meta({"tokenizer": "char", "chars": sorted(set(TEXT))})
    val = np.array(tok.encode(TEXT[-20000:]))
    for frac in (0.02, 0.05, 0.10, 0.20):
        es = corrupt_set("c", val, 32, 200, frac, tok.vocab_size, seed=3, tok=tok)
        clean = torch.from_numpy(val[es.pos])  # (N, T) the true targets
        clean_x = torch.from_numpy(val[es.pos - 1])
        changed = torch.cat([es.x[:, :1] != clean_x[:, :1], es.y != clean], 1)  # (N, T+1) tokens
        assert abs(changed.float().mean().item() - frac) < 0.01
        assert torch.equal(es.y[es.mask], clean[es.mask])  # scored targets clean
        assert torch.equal(es.x[es.mask], clean_x[es.mask])  # ... and the token before them
        assert (~es.mask | ~changed[:, 1:]).all() and es.mask.float().mean() > 1 - 2.2 * frac


def test_bootstrap_covers_the_mean_and_shrinks():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(400, 16, generator=g) + 0.05
    m = torch.rand(400, 16, generator=g) > 0.2
    mean, lo, hi = paired_bootstrap(d, m, 500, seed=1)
    assert abs(mean - d[m].double().mean().item()) < 1e-9 and lo < mean < hi
    _, lo4, hi4 = paired_bootstrap(d[:100], m[:100], 500, seed=1)
    assert hi - lo < 0.7 * (hi4 - lo4)  # 4x the windows: about half the width


def test_shift_axis_with_baseline(runs, tmp_path):
    res = ev.evaluate(cfg(runs, tmp_path, baseline=str(runs["base"]), sets=["val", "corrupt_10", "corrupt_20"]))
    rows = res["sets"]
    assert rows["val"]["r"] == 1.0 and rows["val"]["ln_r"] == 0.0
    ck_b = load_checkpoint(runs["base"])
    base = model_from_checkpoint(ck_b).eval()
    tok = tokenizer_from_meta(ck_b["meta"])
    data = run_data(ck_b, EvalConfig())
    es = corrupt_set("corrupt_20", np.asarray(data.val), 16, 24, 0.2, tok.vocab_size, 2024, tok)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(base.context(es.x).s1_logits.transpose(1, 2), es.y,
                                               reduction="none")
    assert abs(rows["corrupt_20"]["ref_ce"] - ce[es.mask].mean().item()) < 1e-5
    assert abs(rows["corrupt_20"]["gap"] - (rows["corrupt_20"]["ce_k"][2] - rows["corrupt_20"]["ref_ce"])) < 1e-5
    assert "slope_graded" in res["shift"] and len(rows["val"]["step_delta"]) == 8


@pytest.mark.parametrize("kw, msg", [
    (dict(checkpoint="/nope.pt"), "checkpoint not found"),
    (dict(texts=["/nope.txt"], sets=[]), "text not found"),
    (dict(sets=["vall"]), r"unknown set\(s\) \['vall'\]: choose from \['val'"),
    (dict(sets=[], texts=["SHORT"]), "shorter than one window"),
])
def test_bad_input_one_line(runs, tmp_path, kw, msg):
    if kw.get("texts") == ["SHORT"]:
        (tmp_path / "s.txt").write_text("To be")
        kw["texts"] = [str(tmp_path / "s.txt")]
    c = cfg(runs, tmp_path, **{k: v for k, v in kw.items() if k != "checkpoint"})
    if "checkpoint" in kw:
        c.checkpoint = kw["checkpoint"]
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        ev.evaluate(c)
    assert not (tmp_path / "out" / "eval.json").exists()  # nothing written half-way


def test_record_and_baseline_errors(runs, tmp_path):
    ck = torch.load(runs["ebt"], weights_only=True)
    del ck["sampler"]
    atomic_save(ck, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="train_unseen need the checkpoint's sampler record"):
        ev.evaluate(EvalConfig(checkpoint=str(tmp_path / "old.pt"), sets=["val", "train_unseen"], device="cpu"))
    other = dict(ck, meta={"tokenizer": "char", "chars": ck["meta"]["chars"][:-1] + ["~"]})
    atomic_save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different tokenizer"):
        ev.evaluate(cfg(runs, tmp_path, sets=["val"], baseline=str(tmp_path / "other.pt")))
    res = ev.evaluate(cfg(runs, tmp_path, sets=["val"], baseline=str(runs["ebt"])))  # an EBT: allowed
    assert "the baseline is an EBT: its System-1 CE is used" in res["notes"]


@pytest.mark.slow
def test_cli_writes_files(runs, tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "lab.evaluate", f"checkpoint={runs['ebt']}",
                        "sets=[val,corrupt_05,lower]", "windows=8", "bootstrap=20", "steps=2",
                        f"out_dir={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "| lower |" in p.stdout and (tmp_path / "cli" / "eval.json").exists()
    p = subprocess.run([sys.executable, "-m", "lab.evaluate", f"checkpoint={runs['ebt']}",
                        "sets=[nope]"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: unknown set(s) ['nope']")
