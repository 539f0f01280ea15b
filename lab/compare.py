"""Train a suite of runs with identical seed, data order and step budget, then score every run on
the same fixed val windows: the thinking curve (val loss at inference think steps k), best-of-N,
train ms/step, wall-clock, the learned alpha. Writes results/<suite>.json, a markdown table and
plots.

    uv run python -m lab.compare suite=compare                 # EBT vs Transformer (results)
    uv run python -m lab.compare suite=compare scale=gpu       # the same at the 6x384 default size
    uv run python -m lab.compare suite=compare "only=[baseline,ebt]" seeds=[1337,1338]

With eval_sets=[...] every thinking run is also scored by evaluate.py's machinery against the
plain transformer of its seed (results/<eval_name>.*), over `jobs` processes, cached in its run
folder (lab/suite_eval.py); eval_variants adds rows that score a run's checkpoint with other
EvalConfig fields.

Each run keeps its record in results/runs/<name>_s<seed>/record.json: re-running a suite scores
finished runs without retraining them, and results/<suite>.json keeps runs from earlier calls
(e.g. a second seed added later), replacing only the (name, seed) pairs run again. The shift
evaluation does the same with its per-run results (results/<eval_name>_runs.json), so a search
spread over several machines, whose run folders did not travel, still ends in one table. At a
scale other than cpu both file names carry it (e.g. compare_cpu2000.*).

A suite (configs/suite/*.yaml) is a base list of train.py overrides plus named runs, each its
own override list; anything train.py accepts works there: each run is `python train.py` with its
overrides, in a process of its own.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from lab import suite_eval, tasks
from lab.config import CompareConfig
from nanoebm.cli import apply_cli_shims, register_configs, rewrite_argv

REPO = Path(__file__).resolve().parent.parent  # the repository: train.py and its configs/


def compose_train(overrides: list[str]):
    """The config train.py builds from these overrides (legacy names included)."""
    from hydra import compose, initialize_config_dir
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return OmegaConf.to_object(compose(config_name="train", overrides=rewrite_argv(overrides)[0]))


def train_run(overrides: list[str], threads: int) -> None:
    """Train one run the way a user would: `python train.py OVERRIDES`, with `threads` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed with exit code {r.returncode}")


def run_one(job: dict) -> dict:
    """Train one run (in a worker process) unless it already finished, then score it. The
    record is also written to <run folder>/record.json, so an interrupted suite resumes."""
    import torch
    torch.set_num_threads(job["threads"])  # for the scoring; training gets OMP_NUM_THREADS
    root = Path(job["out_dir"])
    rec_path = root / "record.json"
    if rec_path.exists():  # scored before with the same overrides: reuse it
        rec = json.loads(rec_path.read_text())
        if rec["overrides"] == job["overrides"] and rec.get("eval_key") == eval_key(job):
            return rec
    if not (root / "final.pt").exists():  # finished runs (final.pt written) are not retrained
        tasks.write_missing(compose_train(job["overrides"]).data.data_path)  # a task preset's files
        train_run(job["overrides"], job["threads"])
    rec = score(job, (root / "final.pt").resolve().parent)
    tmp = rec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(rec_path)
    return rec


def eval_key(job: dict) -> list:
    return [job["eval_seed"], job["eval_iters"], sorted(job["eval_steps"]), job["n_candidates"],
            job["think_noise"], "train_curve"]


def score(job: dict, run_dir: Path) -> dict:
    """The thinking curve, best-of-N, cost and history of one finished run."""
    import torch
    from nanoebm.checkpoint import load_checkpoint, model_from_checkpoint
    from nanoebm.data import load_data
    from lab.scoring import best_of_n_loss
    from nanoebm.losses import thinking_curve

    cfg = compose_train(job["overrides"])
    ck = load_checkpoint(run_dir / "final.pt")
    model = model_from_checkpoint(ck).eval()
    data = load_data(cfg.data)
    # the same windows for every run of the suite, whatever its training seed
    g = torch.Generator().manual_seed(job["eval_seed"])
    B, T = cfg.data.batch_size, cfg.data.block_size
    batches = [data.get_batch("val", B, T, g) for _ in range(job["eval_iters"])]
    trained_k = model.cfg.eval_think_steps
    ks = sorted(set(job["eval_steps"]) | {trained_k}) if trained_k else [0]
    curve = thinking_curve(model, batches, max(ks), seed=job["eval_seed"])
    # the same curve on fixed *training* windows: does thinking fit what it was trained on?
    g.manual_seed(job["eval_seed"])
    train_batches = [data.get_batch("train", B, T, g) for _ in range(job["eval_iters"])]
    train_curve = thinking_curve(model, train_batches, max(ks), seed=job["eval_seed"])
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rec = {"name": job["name"], "seed": job["seed"], "overrides": job["overrides"],
           "eval_key": eval_key(job), "params": model.num_params(), "steps": ck["step"],
           "wall_s": max(r.get("elapsed_s") or 0 for r in rows),  # training time, evals excluded
           "trained_k": trained_k, "alpha": model.alpha.detach().flatten().tolist(),
           "val_loss_k": {k: curve["loss_k"][k] for k in ks},
           "val_loss_s1": curve.get("loss_s1"), "run_dir": str(run_dir),
           "train_loss_k": {k: train_curve["loss_k"][k] for k in ks}}
    if trained_k and job["n_candidates"] > 1:
        rec["val_loss_bon"] = best_of_n_loss(model, batches, trained_k, job["n_candidates"],
                                             job["think_noise"], seed=job["eval_seed"])
    if tasks.task_name(cfg.data.data_path):  # structured task: determined positions, OOD split
        from lab.config import EvalConfig
        from lab.scorecard import score_checkpoint
        ev = score_checkpoint(EvalConfig(checkpoint=str(run_dir / "final.pt"), sets=["val"],
                                         windows=job["eval_iters"] * B, bon=job["n_candidates"],
                                         think_noise=job["think_noise"], seed=job["eval_seed"]))
        rec["task"] = ev["task"]
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # skip warm-up row
    rec["tokens_per_s"] = statistics.median(tok_s) if tok_s else None
    rec["ms_per_step"] = 1000 * B * T * cfg.train.grad_accum_steps / rec["tokens_per_s"] if tok_s else None
    rec["history"] = [{"step": r["step"], "elapsed_s": r.get("elapsed_s"), "val_loss": r["val_loss"]}
                      for r in rows if "val_loss" in r]
    return rec


def table(records: list[dict], bits: str = "bpb") -> str:
    """Markdown: one row per run (mean over seeds), val CE (nats) at each k, BoN, cost."""
    ks = sorted({int(k) for r in records for k in r["val_loss_k"]})
    by = {}
    for r in records:
        by.setdefault(r["name"], []).append(r)
    head = ["run", "seeds", "S1"] + [f"k={k}" for k in ks] + ["BoN", "ms/step", "alpha", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    for name, rs in by.items():
        cells = [name, ",".join(str(r["seed"]) for r in rs)]
        s1 = [r["val_loss_s1"] for r in rs if r.get("val_loss_s1") is not None]
        cells.append(f"{mean(s1):.4f}" if s1 else "–")
        for k in ks:
            v = [r["val_loss_k"][k] for r in rs if k in r["val_loss_k"]]
            cells.append(f"{mean(v):.4f}" if v else "–")
        bon = [r["val_loss_bon"] for r in rs if "val_loss_bon" in r]
        cells.append(f"{mean(bon):.4f}" if bon else "–")
        ms = [r["ms_per_step"] for r in rs if r["ms_per_step"]]
        cells += [f"{mean(ms):.0f}" if ms else "–",
                  "/".join(f"{a:.3g}" for a in rs[0]["alpha"]), f"{mean([r['wall_s'] for r in rs]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(len(rs) > 1 for rs in by.values()):  # run-to-run noise: spread at the trained K
        for name, rs in by.items():
            if len(rs) > 1:
                fin = [r["val_loss_k"][r["trained_k"]] for r in rs]
                lines.append(f"\n{name}: val CE at the trained K over seeds "
                             f"{', '.join(f'{f:.4f}' for f in fin)} (spread {max(fin) - min(fin):.4f})")
    return "\n".join(lines)


def results_table(records: list[dict]) -> str:
    """Markdown, one row per (run, seed), in bits per character: the README "Results" table."""
    bits = lambda x: f"{x / math.log(2):.4f}" if x is not None else "–"  # noqa: E731
    head = ["run", "seed", "params", "steps", "wall-clock", "tokens/s", "val bpb S1",
            "val bpb after thinking (k=K)", "best-of-N", "val bpb at k=" + ",".join(
                str(k) for k in records[0]["eval_key"][2]), "train-window bpb k=0→K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        k = r["trained_k"]
        curve = "/".join(bits(r["val_loss_k"][j]) for j in r["eval_key"][2] if j in r["val_loss_k"]) \
            if k else "–"
        lines.append("| " + " | ".join([
            r["name"], str(r["seed"]), f"{r['params'] / 1e6:.2f}M", str(r["steps"]),
            f"{r['wall_s'] / 60:.1f} min", f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "–",
            bits(r.get("val_loss_s1")),  # None (no S1 head) prints "–"
            bits(r["val_loss_k"][k]) + (f" (K={k})" if k else ""), bits(r.get("val_loss_bon")),
            curve, "→".join(bits(r["train_loss_k"][j]) for j in range(k + 1) if j in r["train_loss_k"])
            if k and "train_loss_k" in r else "–"]) + " |")
    return "\n".join(lines)


def task_table(records: list[dict]) -> str:
    """Markdown for structured tasks, one row per run (mean over seeds, the gain per seed): CE
    and accuracy on the determined positions at k=0 and k=K, in distribution (val) and out of it
    (ood), best-of-N accuracy, and exact match of addition answers."""
    by = {}
    for r in records:
        if "task" in r:
            by.setdefault(r["name"], []).append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    head = ["run", "seeds"] + [f"{s} {c}" for s in ("val", "ood") for c in
                               ("CE k=0", "CE k=K", "gain per seed [95% CI]", "acc k=0", "acc k=K", "acc BoN")] + ["exact match ood s1/think/BoN"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in by.items():
        cells = [name, ",".join(str(r["seed"]) for r in rs)]
        for split in ("val", "ood"):
            g = [r["task"]["groups"][split]["determined"] for r in rs]
            K = rs[0]["trained_k"]
            cells += [f"{mean([x['ce_k'][0] for x in g]):.4f}", f"{mean([x['ce_k'][K] for x in g]):.4f}",
                      " / ".join(f"{x['gain']:+.4f} [{x['gain_ci'][0]:+.4f}, {x['gain_ci'][1]:+.4f}]" for x in g)
                      if "gain" in g[0] else "–",  # each seed's own: a mean would hide disagreement
                      f"{mean([x['acc_k'][0] for x in g]):.3f}", f"{mean([x['acc_k'][K] for x in g]):.3f}",
                      f"{mean([x['acc_bon'] for x in g]):.3f}" if "acc_bon" in g[0] else "–"]
        em = [r["task"].get("exact_match", {}).get("ood") for r in rs]
        cells.append("/".join(f"{mean([e[k] for e in em]):.3f}" for k in ("s1", "think", "bon") if k in em[0])
                     if em[0] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("tab10" if len(records) <= 10 else "tab20")
    for i, r in enumerate(records):
        lab, c = f"{r['name']} s{r['seed']}", cmap(i % cmap.N)  # one colour per run, all panels
        h = [x for x in r["history"] if x["step"] > 0]  # the untrained step 0 would set the scale
        ax[0].plot([x["step"] for x in h], [x["val_loss"] / math.log(2) for x in h], color=c, label=lab)
        if all(x["elapsed_s"] is not None for x in h):
            ax[1].plot([x["elapsed_s"] for x in h], [x["val_loss"] / math.log(2) for x in h], color=c)
        if r["trained_k"]:
            ks = sorted(r["val_loss_k"])
            ax[2].plot(ks, [r["val_loss_k"][k] / math.log(2) for k in ks], "o-", color=c)
            if "val_loss_bon" in r:  # best-of-N at the trained K
                ax[2].plot([r["trained_k"]], [r["val_loss_bon"] / math.log(2)], "*", ms=12, color=c)
        else:  # a baseline: its val bpb as the bar every thinking curve is read against
            ax[2].axhline(r["val_loss_k"][0] / math.log(2), ls="--", lw=1, color=c)
    ax[2].set_title("thinking curve (star: best-of-N at the trained K; dashed: baseline)", fontsize=9)
    for a, xl in zip(ax, ("train step", "wall-clock s", "inference think steps k")):
        a.set_xlabel(xl)
        a.set_ylabel("val bits per token")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    later = [v for r in records for k, v in r["val_loss_k"].items() if k > 0]
    if later:  # keep a noise start's k=0 (several bits) from flattening the rest; label it
        top = 1.05 * max(later + [r["val_loss_k"][0] for r in records if r["trained_k"]
                                  and r["val_loss_k"][0] < 1.5 * max(later)]) / math.log(2)
        ax[2].set_ylim(top=top)
        for r in records:
            if r["trained_k"] and r["val_loss_k"][0] / math.log(2) > top:
                ax[2].annotate(f"k=0: {r['val_loss_k'][0] / math.log(2):.2f} ↑", (0, top),
                               xytext=(0.2, 0.97 * top), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


@hydra.main(version_base="1.3", config_path="configs", config_name="compare")
def main(cfg) -> None:
    try:
        cc: CompareConfig = OmegaConf.to_object(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    names = [n for n in cc.runs if not cc.only or n in cc.only]
    if cc.only and set(cc.only) - set(cc.runs):
        raise SystemExit(f"error: only= names not in suite {cc.suite}: {sorted(set(cc.only) - set(cc.runs))}")
    if cc.scale not in cc.scales:
        raise SystemExit(f"error: unknown scale={cc.scale}; choose one of {sorted(cc.scales)} "
                         "(configs/compare.yaml `scales`)")
    out = Path(cc.out_dir)
    tag = "" if cc.scale in ("cpu", "own") else f"_{cc.scale}"  # other scales never reuse cpu runs
    run_dir = lambda n, s: out / "runs" / f"{n}{tag}_s{s}"  # noqa: E731
    jobs = [{"name": n, "seed": s, "threads": max(1, cc.threads), "out_dir": str(run_dir(n, s)),
             "overrides": [*cc.scales[cc.scale], *cc.base, *cc.runs[n], f"train.seed={s}",
                           f"out_dir={run_dir(n, s)}"],
             "eval_seed": cc.eval_seed, "eval_iters": cc.eval_iters, "eval_steps": list(cc.eval_steps),
             "n_candidates": cc.n_candidates, "think_noise": cc.think_noise}
            for s in cc.seeds for n in names]
    with ProcessPoolExecutor(max_workers=cc.jobs, mp_context=get_context("spawn")) as ex:
        records = list(ex.map(run_one, jobs))
    out.mkdir(parents=True, exist_ok=True)
    eval_name = cc.eval_name or cc.suite + "_eval"
    stem, eval_name = f"{cc.suite}{tag}", eval_name if tag in eval_name else eval_name + tag
    stem += "_train" if eval_name == stem else ""  # the eval table took the suite's own name
    path = out / f"{stem}.json"
    if path.exists():  # keep earlier runs of this suite (other names/seeds); replace re-runs
        done = {(r["name"], r["seed"]) for r in records}
        records = [r for r in json.loads(path.read_text()) if (r["name"], r["seed"]) not in done] + records
        order = list(cc.runs)
        records.sort(key=lambda r: (order.index(r["name"]) if r["name"] in order else len(order), r["seed"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    for r in records:  # JSON made the step keys strings
        for key in ("val_loss_k", "train_loss_k"):
            if key in r:
                r[key] = {int(k): v for k, v in r[key].items()}
    md = f"{results_table(records)}\n\nval CE (nats) by inference think step k:\n\n{table(records)}"
    if any("task" in r for r in records):
        md += f"\n\ndetermined positions (nats, argmax accuracy):\n\n{task_table(records)}"
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    plots(records, out / f"{stem}.png")
    print(f"wrote {path} and {out / f'{stem}.md'}")
    if cc.eval_sets:
        fresh = {(r["name"], r["seed"]) for r in records if r["seed"] in cc.seeds and r["name"] in names}
        try:
            suite_eval.shift_eval(cc, records, out, eval_name, fresh)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    apply_cli_shims(schema=CompareConfig)
    register_configs({"base_compare": CompareConfig})
    main()
