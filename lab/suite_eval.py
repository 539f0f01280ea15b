"""compare.py's shift evaluation: evaluate.py's sets scored on every thinking run of a suite
(and on its inference-only variants), with the plain transformer of the same seed as the shift
axis, cached in each run folder and scored over worker processes; results/<eval_name>.*
"""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from lab.config import CompareConfig


def eval_one(job: dict) -> dict:
    """Score one checkpoint on the eval sets (in a worker process); cache the result."""
    import torch
    from nanoebm.checkpoint import atomic_write_text
    from lab.config import EvalConfig
    from lab.scorecard import score_checkpoint
    torch.set_num_threads(job["threads"])
    text = json.dumps({"key": job["key"], **score_checkpoint(EvalConfig(**job["eval"]))}, indent=1)
    atomic_write_text(job["cache"], text)
    return json.loads(text)  # as a later call reads it from the cache


def cache_key(key: str | None) -> str | None:
    """An eval cache key (JSON of EvalConfig's fields) without the fields at their defaults,
    so that adding an option to EvalConfig leaves the caches written before it valid."""
    from lab.config import EvalConfig
    if key is None:
        return None
    default = dataclasses.asdict(EvalConfig())
    return json.dumps({k: v for k, v in json.loads(key).items() if k not in default or v != default[k]},
                      sort_keys=True)


def score_evals(jobs: list[dict], workers: int) -> list[dict]:
    """Every job's result: read from its cache when the key matches (no process started),
    the rest scored over `workers` processes."""
    res = []
    for j in jobs:
        c = Path(j["cache"])
        r = json.loads(c.read_text()) if c.exists() else {}
        fresh = cache_key(r.get("key")) == cache_key(j["key"])
        # a cache from before the controls existed lacks them, though its key matches
        res.append(r if fresh and ("controls" in r or not j["eval"].get("controls", True)) else None)
    todo = [i for i, r in enumerate(res) if r is None]
    if todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn")) as ex:
            for i, r in zip(todo, ex.map(eval_one, [jobs[i] for i in todo])):
                res[i] = r
    return res


def eval_items(cc: CompareConfig, records: list[dict]) -> list[dict]:
    """One item per run and per eval variant of a thinking run, in table order; thinking runs
    carry a scoring job with the plain transformer of the same seed as the reference."""
    from lab.config import EvalConfig
    base = {r["seed"]: r["run_dir"] for r in records if r["trained_k"] == 0}
    items = []
    for r in records:
        variants = {v: spec["eval"] for v, spec in cc.eval_variants.items() if spec["run"] == r["name"]}
        if r["trained_k"] == 0:
            if variants:
                raise ValueError(f"eval_variants.{next(iter(variants))}: run {r['name']} is a plain "
                                 "transformer (nothing to think): name a thinking run")
            items.append({"name": r["name"], "seed": r["seed"], "record": r, "eval": None, "variant": None})
            continue
        ec = EvalConfig(checkpoint=str(Path(r["run_dir"]) / "final.pt"), sets=list(cc.eval_sets),
                        baseline=str(Path(base[r["seed"]]) / "final.pt") if r["seed"] in base else None,
                        windows=cc.eval_windows, bon=cc.n_candidates, think_noise=cc.think_noise,
                        seed=cc.eval_seed, diagnose=cc.diagnose, steps=max(cc.eval_steps),
                        probes=cc.eval_probes)
        for name, over in [(r["name"], None), *variants.items()]:
            e = dataclasses.asdict(dataclasses.replace(ec, **(over or {})))
            cache = Path(r["run_dir"]) / ("shift_eval.json" if over is None else f"shift_eval_{name}.json")
            items.append({"name": name, "seed": r["seed"], "record": r,
                          "variant": None if over is None else {"run": r["name"], "eval": over},
                          "job": {"eval": e, "key": json.dumps(e, sort_keys=True), "cache": str(cache),
                                  "threads": max(1, cc.threads)}})
    return items


def earlier_results(path: Path) -> dict[str, dict]:
    """The per-run results an earlier call of the suite wrote (<name>_runs.json), by label."""
    if not path.exists():
        return {}
    return {x["run"]: {k: v for k, v in x.items() if k != "run"} for x in json.loads(path.read_text())}


def shift_eval(cc: CompareConfig, records: list[dict], out: Path, name: str,
               fresh: set[tuple[str, int]]) -> None:
    """evaluate.py's sets on every thinking run and eval variant, cached per run folder, scored
    over cc.jobs processes, combined into results/<name>.*.

    records: the suite's records, earlier calls' included; fresh: the (name, seed) pairs of this
    call, which are scored. The other runs keep the result an earlier call wrote, so a search
    that spans machines (run folders not carried over) still tabulates every run; a run with
    neither is left out."""
    from nanoebm.checkpoint import atomic_write_text
    from lab import controls
    from lab.diagnose import report
    from lab.scorecard import plot, table
    earlier = earlier_results(out / f"{name}.json")
    items, todo = [], []
    for it in eval_items(cc, records):
        label = f"{it['name']} s{it['seed']}"
        if "job" in it and (it["record"]["name"], it["seed"]) in fresh:
            todo.append(it)
        elif "job" in it:
            if label not in earlier:
                continue
            it["eval"] = earlier[label]
        items.append(it)
    if not todo:
        raise ValueError("eval_sets= scores thinking runs: this call has none (see only=)")
    for it, res in zip(todo, score_evals([it["job"] for it in todo], cc.jobs)):
        it["eval"] = res
    results, md = [], []
    for it in [it for it in items if "job" in it]:
        label, res = f"{it['name']} s{it['seed']}", it["eval"]
        results.append((label, res))
        md += [f"## {label}", "", table(res), ""]
        if res.get("diagnose"):
            md += [f"### diagnostics, {label}", "", report(res["diagnose"]), ""]
        if "controls" in res:
            md += [f"### controls, {label}", "", controls.table(res), ""]
    atomic_write_text(out / f"{name}.json", json.dumps(
        [{"run": lab, **{k: v for k, v in res.items() if k != "key"}} for lab, res in results], indent=1))
    atomic_write_text(out / f"{name}.md", "\n".join(md) + "\n")
    with_controls = [(lab, res) for lab, res in results if "controls" in res]
    # Fig. 7: with the controls, every method against the shift; else thinking alone
    (controls.plot if with_controls else plot)(with_controls or results, out / f"{name}.png")
    print("\n".join(md))
    print(f"wrote {out / name}.json, .md, .png")
