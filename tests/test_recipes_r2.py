"""compare.py's shift evaluation: the one-row-per-recipe table (nanoebm/recipes_table.py), eval
variants, scoring over worker processes, and the verifier correlation from the thinking curve.

    uv run pytest tests/test_recipes_r2.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import train as train_mod
from nanoebm import diagnose as dg, recipes_table as rt, suite_eval
from nanoebm.script_config import CompareConfig, EvalConfig
from nanoebm.evaluate import score_windows
from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.scorecard import summarise
from nanoebm.shift import EvalSet
from nanoebm.think import initial_logits, think
from tests.conftest import REPO, SMALL, compose, tiny_cfg


def ranks(v: torch.Tensor) -> np.ndarray:
    return np.argsort(np.argsort(v.numpy()))


def test_spearman_from_the_curve_is_the_diagnostics_one():
    """scorecard's Spearman(E(z_K), CE(z_K)) reuses the chain's energies: equal to diagnose.py's
    and to a direct computation (a K-step chain, its final energy, ranks by numpy)."""
    torch.manual_seed(0)
    m = EBT(tiny_cfg(think_steps=2, think_prox_weight=0.0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (6, 8), generator=g), torch.randint(0, 11, (6, 8), generator=g)
    mask = torch.rand(6, 8, generator=g) > 0.25
    mask[:, :3] = False  # short prefixes repeat across windows: tied energies, ranks ill-defined
    es = EvalSet("t", x, y, mask)
    r = score_windows(m, x, y, 4, trained_k=2, batch_size=3, seed=5)  # steps past K, as scored
    got = summarise(es, r, r["ce_s1"], 2, EvalConfig(bootstrap=20), math.log(2))["spearman_E_ce"]
    d = dg.collect(m, es, 2, batch_size=3, seed=5, device="cpu", topk=11)
    assert got == dg.spearman(d["E_final"][mask], d["ceK"][mask])
    E, C = [], []
    for i in range(0, 6, 3):
        with torch.no_grad():
            ctx = m.context(x[i:i + 3])
            out = think(m, ctx, initial_logits(m, ctx, 8), 2, noise=0.0, final_energy=True)
            E.append(out.final_energy)
            C.append(ce(out.final, y[i:i + 3], reduction="none").view(3, 8))
    E, C = torch.cat(E)[mask], torch.cat(C)[mask]
    assert abs(got - np.corrcoef(ranks(E), ranks(C))[0, 1]) < 1e-9 and abs(got) > 1e-3


def synthetic(seed, shift, gains, spearman=0.1, diag=False):
    """One scorecard result: val + two corruption levels + train_seen."""
    names = ["val", "train_seen", "corrupt_05", "corrupt_20"]
    ln_r = [0.0, -0.2 + shift, 0.15 + shift, 0.6 + shift]
    sets = {}
    for n, lr, gn in zip(names, ln_r, gains):
        sets[n] = {"ce_k": [2.0 + seed / 100 + j / 1000 for j in range(9)], "ce_bon": 2.5 + seed / 100,
                   "ln_r": lr, "gain": gn, "gain_ci": [gn - 0.01 * seed, gn + 0.01 * seed], "ref_ce": 1.9 + seed}
    if not diag:
        sets["val"]["spearman_E_ce"] = spearman
    return {"baseline": "b.pt", "sets": sets, "diagnose": {"val": {"spearman_E_ce": spearman}} if diag else None}


def test_recipe_table_from_synthetic_records():
    rec = lambda k, ms, a: {"trained_k": k, "ms_per_step": ms, "alpha": a}  # noqa: E731
    r1 = synthetic(1, 0.0, [0.01, 0.03, -0.02, -0.05], 0.2)
    r2 = synthetic(2, 0.1, [0.02, 0.01, -0.01, -0.07], 0.4, diag=True)  # Spearman only in diagnose
    items = [{"name": "baseline", "seed": 1, "record": rec(0, 10, [1.0]), "eval": None, "variant": None},
             {"name": "baseline", "seed": 2, "record": rec(0, 14, [1.0]), "eval": None, "variant": None},
             {"name": "ebt", "seed": 1, "record": rec(2, 100, [0.5, 1.0]), "eval": r1, "variant": None},
             {"name": "ebt", "seed": 2, "record": rec(2, 120, [0.7, 2.0]), "eval": r2, "variant": None},
             {"name": "neutral", "seed": 1, "record": rec(2, 100, [0.5, 1.0]), "eval": r1,
              "variant": {"run": "ebt", "eval": {"think_noise": 0.1}}}]
    sets, ks = ["val", "train_seen", "corrupt_05", "corrupt_20"], [0, 1, 2, 4, 8]
    base, ebt, neutral = rt.recipe_rows(items, sets, ks)
    assert base["val_ce_k"] == {0: pytest.approx((2.9 + 3.9) / 2)} and base["ms_per_step"] == 12
    assert ebt["seeds"] == [1, 2] and ebt["ci_seed"] == 1
    for k in ks:
        assert ebt["val_ce_k"][k] == pytest.approx((r1["sets"]["val"]["ce_k"][k] + r2["sets"]["val"]["ce_k"][k]) / 2)
    assert ebt["val_ce_bon"] == pytest.approx(2.515)
    assert ebt["gain"] == pytest.approx({"val": 0.015, "train_seen": 0.02, "corrupt_05": -0.015, "corrupt_20": -0.06})
    assert ebt["gain_ci"]["corrupt_20"] == r1["sets"]["corrupt_20"]["gain_ci"]  # the first seed's interval
    slopes = [np.polyfit([r["sets"][n]["ln_r"] for n in ("val", "corrupt_05", "corrupt_20")],
                         [r["sets"][n]["gain"] for n in ("val", "corrupt_05", "corrupt_20")], 1)[0] for r in (r1, r2)]
    assert ebt["slope_graded"] == pytest.approx(np.mean(slopes), abs=1e-12) and slopes[0] != slopes[1]
    assert ebt["spearman_val"] == pytest.approx(0.3)  # seed 2's from its diagnostics
    assert ebt["alpha"] == pytest.approx([0.6, 1.5]) and ebt["ms_per_step"] == 110
    assert neutral["seeds"] == [1] and neutral["slope_graded"] == pytest.approx(slopes[0], abs=1e-12)
    md = rt.table([base, ebt, neutral], sets, ks, 4)
    lines = md.splitlines()
    assert lines[0].startswith("| recipe | seeds | K | val k=0 | val k=1 |") and "best-of-4 at K" in lines[0]
    row = next(x for x in lines if x.startswith("| ebt |")).split(" | ")
    assert row[1:3] == ["1,2", "2"] and row[8] == "2.5150"
    assert row[9] == "+0.0100 [+0.0000, +0.0200] / +0.0200 [+0.0000, +0.0400]"  # each seed's own
    assert ebt["gain_by_seed"]["corrupt_20"] == [-0.05, -0.07] and ebt["slope_by_seed"] == pytest.approx(slopes)
    assert row[-6] == f"{slopes[0]:+.4f} / {slopes[1]:+.4f}" and row[-5] == "+0.300" and row[-1] == "0.6/1.5 |"
    assert row[-4] == "– / –" and row[-3] == "–"  # no probes scored
    assert next(x for x in lines if x.startswith("| neutral |")).split(" | ")[9] == "+0.0100 [+0.0000, +0.0200]"
    assert next(x for x in lines if x.startswith("| baseline |")).count("–") == 15
    assert "- neutral: the checkpoint of ebt, scored with think_noise=0.1" in md


def test_variant_and_table_options_fail_with_one_line():
    runs = {"baseline": [], "ebt": []}
    ok = CompareConfig(runs=runs, eval_variants={"v": {"run": "ebt", "eval": {"steps": 3}}})
    assert ok.eval_variants["v"]["eval"] == {"steps": 3}
    for variants, msg in [({"v": {"run": "ebt", "eval": {"stepz": 3}}},
                           "unknown EvalConfig field 'stepz': choose from baseline, batch_size, "),
                          ({"v": {"run": "ebtt", "eval": {}}},
                           "run 'ebtt' is not in suite recipes: choose one of baseline, ebt"),
                          ({"v": {"rn": "ebt", "eval": {}}}, r"eval_variants.v must be \{run: "),
                          ({"ebt": {"run": "ebt", "eval": {}}}, "ebt is a run of the suite already")]:
        with pytest.raises(ValueError, match=msg) as e:
            CompareConfig(runs=runs, eval_variants=variants)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="eval_table='row': choose one of runs, recipes"):
        CompareConfig(eval_table="row")


def test_suite_file_declares_the_round2_search():
    s = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "suite" / "recipes_r2.yaml"))
    assert s["suite"] == s["eval_name"] == "thinking_recipes_r2" and s["eval_table"] == "recipes"
    assert s["eval_sets"] == ["val", "train_seen", "train_unseen", "corrupt_05", "corrupt_20"]
    assert s["runs"]["baseline"] == ["model.think_steps=0"] and s["runs"]["default"] == []
    assert len(s["runs"]) == 11 and s["runs"]["h7_trained"] == ["model.think_neutral=true"]
    assert s["eval_variants"] == {"h7_neutral": {"run": "default", "eval": {"think_neutral": True}}}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny baseline and EBT, as compare.py's records."""
    root = tmp_path_factory.mktemp("r2runs")
    recs = []
    for name, extra in (("baseline", ["model.think_steps=0"]), ("ebt", [])):
        run = train_mod.train(compose(*SMALL, *extra, f"out_dir={root / name}"))["run_dir"]
        recs.append({"name": name, "seed": 1, "run_dir": str(run), "trained_k": 0 if extra else 2})
    return recs


@pytest.mark.slow  # worker processes
def test_parallel_scoring_equals_sequential_variants_and_free_cache(tiny_runs, monkeypatch):
    cc = CompareConfig(runs={"baseline": [], "ebt": []}, eval_sets=["val", "corrupt_10"], eval_windows=8,
                       eval_steps=[0, 1, 2], n_candidates=2,
                       eval_variants={"v3": {"run": "ebt", "eval": {"steps": 3}},
                                      "vn": {"run": "ebt", "eval": {"think_noise": 0.0}}})
    items = suite_eval.eval_items(cc, tiny_runs)
    assert [(it["name"], "job" in it) for it in items] == [
        ("baseline", False), ("ebt", True), ("v3", True), ("vn", True)]
    jobs = [it["job"] for it in items[1:]]
    par = suite_eval.score_evals(jobs, 2)
    for j in jobs:
        Path(j["cache"]).unlink()
    seq = suite_eval.score_evals(jobs, 1)
    assert par == seq
    ebt, v3, vn = seq
    ckpt = str(Path(tiny_runs[1]["run_dir"]) / "final.pt")
    assert ebt["checkpoint"] == v3["checkpoint"] == vn["checkpoint"] == ckpt
    assert ebt["baseline"] == str(Path(tiny_runs[0]["run_dir"]) / "final.pt")
    assert [Path(j["cache"]).name for j in jobs] == ["shift_eval.json", "shift_eval_v3.json", "shift_eval_vn.json"]
    assert ebt["steps"] == 2 and v3["steps"] == 3  # the override reached the scoring
    assert v3["sets"]["val"]["ce_k"][:3] == ebt["sets"]["val"]["ce_k"]  # the same chain, one step more
    # no chain noise: best-of-N changes, the noise-free curve does not
    assert vn["sets"]["val"]["ce_k"] == ebt["sets"]["val"]["ce_k"]
    assert vn["sets"]["val"]["ce_bon"] != ebt["sets"]["val"]["ce_bon"]

    def no_pool(*a, **k):
        raise AssertionError("a cached result started a process")
    monkeypatch.setattr(suite_eval, "ProcessPoolExecutor", no_pool)
    assert suite_eval.score_evals(jobs, 2) == seq
    with pytest.raises(ValueError, match="run baseline is a plain transformer"):
        on_base = CompareConfig(runs=cc.runs, eval_variants={"vb": {"run": "baseline", "eval": {}}})
        suite_eval.eval_items(on_base, tiny_runs)


@pytest.mark.slow
def test_compare_writes_the_recipe_table_and_variant_rows(tmp_path):
    base = "[" + ",".join(f"'{s}'" for s in [*SMALL, "train.max_steps=3"] if s != "train.max_steps=2") + "]"
    cmd = [sys.executable, str(REPO / "compare.py"), "suite=compare", "only=[baseline,ebt]", f"base={base}",
           "eval_iters=2", "eval_steps=[0,1,2]", "n_candidates=2", "seeds=[1]", f"out_dir={tmp_path}",
           "eval_sets=[val,corrupt_10]", "eval_windows=8", "eval_name=compare", "eval_table=recipes", "jobs=2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    bad = subprocess.run(cmd + ["+eval_variants.v3={run:ebt,eval:{stepz:3}}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "error: eval_variants.v3: unknown EvalConfig field 'stepz'" in bad.stderr
    assert not (tmp_path / "runs").exists()  # failed before training
    r = subprocess.run(cmd + ["+eval_variants.v3={run:ebt,eval:{steps:3}}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    per_run = {x["run"]: x for x in json.loads((tmp_path / "compare_runs.json").read_text())}
    assert list(per_run) == ["ebt s1", "v3 s1"] and per_run["v3 s1"]["steps"] == 3
    summary = json.loads((tmp_path / "compare.json").read_text())
    rows = {x["recipe"]: x for x in summary["rows"]}
    assert list(rows) == ["baseline", "ebt", "v3"] and rows["v3"]["variant"] == {"run": "ebt", "eval": {"steps": 3}}
    val = per_run["ebt s1"]["sets"]["val"]
    assert [rows["ebt"]["val_ce_k"][str(k)] for k in range(3)] == val["ce_k"]
    assert rows["ebt"]["gain"]["corrupt_10"] == per_run["ebt s1"]["sets"]["corrupt_10"]["gain"]
    assert rows["ebt"]["spearman_val"] == val["spearman_E_ce"]
    assert rows["baseline"]["val_ce_k"]["0"] == val["ref_ce"]
    # the training table stepped aside for the eval table of the same name
    assert {x["name"] for x in json.loads((tmp_path / "compare_train.json").read_text())} == {"baseline", "ebt"}
    assert "| v3 | 1 | 2 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 5000 and (tmp_path / "compare_runs.png").exists()


def test_cache_key_survives_a_new_eval_option_but_not_a_changed_one():
    import dataclasses
    import json
    from nanoebm.suite_eval import cache_key
    from nanoebm.script_config import EvalConfig
    new = dataclasses.asdict(EvalConfig(checkpoint="a/final.pt"))
    old = {k: v for k, v in new.items() if k != "probes"}  # written before `probes` existed
    assert cache_key(json.dumps(old)) == cache_key(json.dumps(new, sort_keys=True))
    assert cache_key(json.dumps({**old, "windows": 7})) != cache_key(json.dumps(new))
    assert cache_key(json.dumps({**new, "probes": True})) != cache_key(json.dumps(new))


def test_probe_columns_are_means_over_seeds():
    probe = lambda h, tv: {"sharpness": {"s=0.5": {"entropy": [2.0, 2.0 + h]}, "s=1": {"entropy": [1.0, 1.0]},  # noqa: E731
                                        "s=2": {"entropy": [0.5, 0.5 - h]}},
                          "path_independence": {"tv_s1_vs_noise": tv}}
    cells = rt.probe_cells([probe(0.1, 0.2), probe(0.3, 0.4)])
    assert cells == pytest.approx({"dH_flat": 0.2, "dH_sharp": -0.2, "tv_paths": 0.3})
    assert rt.probe_cells([]) == {}


def test_earlier_results_are_kept_for_runs_not_scored_again(tmp_path, monkeypatch):
    """A call scores only its own runs; the others keep the per-run result an earlier call wrote
    (their run folders may be on another machine), and a run with neither is left out."""
    rec = lambda n, k: {"name": n, "seed": 1, "run_dir": str(tmp_path / n), "trained_k": k,  # noqa: E731
                        "ms_per_step": 10.0, "alpha": [1.0]}
    records = [rec("baseline", 0), rec("ebt", 2), rec("old", 2), rec("lost", 2)]
    stale, kept = synthetic(1, 0.0, [0.5, 0.5, 0.5, 0.5]), synthetic(2, 0.0, [0.02, 0.01, -0.01, -0.07])
    (tmp_path / "t_runs.json").write_text(json.dumps([{"run": "ebt s1", **stale}, {"run": "old s1", **kept}]))
    new = synthetic(1, 0.0, [0.01, 0.03, -0.02, -0.05])
    scored = []

    def fake_scores(jobs, workers):
        scored.extend(Path(j["eval"]["checkpoint"]).parent.name for j in jobs)
        return [new for _ in jobs]
    monkeypatch.setattr(suite_eval, "score_evals", fake_scores)
    monkeypatch.setattr("nanoebm.scorecard.table", lambda res: "per-run table")  # needs full results
    monkeypatch.setattr("nanoebm.scorecard.plot", lambda results, path: None)
    cc = CompareConfig(runs={n["name"]: [] for n in records}, eval_sets=list(new["sets"]),
                       eval_steps=[0, 1, 2], eval_table="recipes")
    suite_eval.shift_eval(cc, records, tmp_path, "t", fresh={("baseline", 1), ("ebt", 1)})
    assert scored == ["ebt"]
    per_run = {x["run"]: x for x in json.loads((tmp_path / "t_runs.json").read_text())}
    assert list(per_run) == ["ebt s1", "old s1"]
    assert per_run["ebt s1"]["sets"] == new["sets"] and per_run["old s1"]["sets"] == kept["sets"]
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "ebt", "old"]
    assert rows["old"]["gain"]["corrupt_20"] == -0.07 and rows["ebt"]["gain"]["corrupt_20"] == -0.05
    with pytest.raises(ValueError, match="this call has none"):
        suite_eval.shift_eval(cc, records, tmp_path, "t", fresh={("baseline", 1)})
