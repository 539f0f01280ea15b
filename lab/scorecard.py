"""Score a checkpoint on every evaluation set: the rows behind evaluate.py's eval.json.

For each set (lab/shift.py) the thinking curve at k = 0..steps on fixed windows (paired), the
System-1 CE, best-of-N, energies, the gain from thinking with a paired bootstrap interval, and
the CE of a reference model (a plain-transformer `baseline`, or the EBT's own System 1) that
places the set on the shift axis r = exp(CE_ref(set) - CE_ref(val)), and the verifier check
Spearman(E(z_K), CE(z_K)) over positions (the chain's own energies: no extra pass). Structured
tasks add determined-vs-free metrics (lab/taskeval.py); diagnose=true adds lab/diagnose.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from nanoebm import runtime as rt
from lab import taskeval, tasks
from nanoebm.checkpoint import BUNDLED, model_from_checkpoint, open_checkpoint
from nanoebm.config import DataConfig
from lab.config import EvalConfig
from lab.diagnose import spearman
from lab.scoring import masked_mean, paired_bootstrap, score_windows
from nanoebm.tokenizer import resolve_tokenizer
from lab.shift import builtin_sets, check_set_names, text_set


def load_model(name, out_dir, device, bpe_encoding=None, **overrides):
    """(path, checkpoint dict, model in eval mode, its tokenizer, the line saying which) for
    checkpoint=NAME (nanoebm.checkpoint.open_checkpoint); overrides: thinking options."""
    path, ck, line = open_checkpoint(name, out_dir)
    model = model_from_checkpoint(ck, device, **overrides).eval()
    tok = resolve_tokenizer(ck.get("meta"), model.cfg.vocab_size, None, bpe_encoding)
    return path, ck, model, tok, line


def run_data(ck: dict, cfg: EvalConfig):
    """The run's own corpus (train and val splits), as train.py loaded it."""
    from nanoebm.data import load_data
    names = {f.name for f in dataclasses.fields(DataConfig)}
    dc = DataConfig(**{k: v for k, v in (ck.get("config") or {}).get("data", {}).items() if k in names})
    if cfg.data_path is not None:
        dc = dataclasses.replace(dc, data_path=cfg.data_path)
    if cfg.bpe_encoding is not None:
        dc = dataclasses.replace(dc, bpe_encoding=cfg.bpe_encoding)
    data = load_data(dc)
    if data.meta.get("chars", data.meta.get("sha256")) != ck["meta"].get("chars", ck["meta"].get("sha256")):
        raise ValueError(f"{dc.data_path} does not give the checkpoint's vocabulary: point "
                         "data_path at the run's training data")
    return data


def load_baseline(cfg: EvalConfig, ck: dict, device):
    """The plain-transformer checkpoint that defines the shift axis, checked against the EBT."""
    _, bck, bmodel, _, _ = load_model(cfg.baseline, cfg.train_out_dir, device, cfg.bpe_encoding)
    if bck.get("meta") != ck.get("meta"):
        raise ValueError(f"baseline {cfg.baseline} has a different tokenizer than the checkpoint: "
                         "use a baseline trained on the same vocabulary")
    note = ""
    if bmodel.cfg.think_steps > 0:
        if not bmodel.has_s1:
            raise ValueError(f"baseline {cfg.baseline} is an EBT without an S1 head: give a "
                             "plain transformer (model.think_steps=0)")
        note = "the baseline is an EBT: its System-1 CE is used"
    return bmodel, note


def summarise(es, r: dict, base_ce, K: int, cfg: EvalConfig, ln2: float) -> dict:
    """One set's row: CE and bits at every k, S1, best-of-N, energies, gains with intervals."""
    m = es.mask
    ce_k = [masked_mean(r["ce_k"][..., k], m) for k in range(r["ce_k"].shape[-1])]
    s = {"n_windows": len(es.x), "n_positions": int(m.sum()), "note": es.note, "ce_k": ce_k,
         "bits_k": [c / ln2 for c in ce_k]}
    if "energy_k" in r:
        s["energy_k"] = [masked_mean(r["energy_k"][..., k], m) for k in range(r["energy_k"].shape[-1])]
    if "ce_s1" in r:
        s["ce_s1"] = masked_mean(r["ce_s1"], m)
    if "ce_bon" in r:
        s["ce_bon"] = masked_mean(r["ce_bon"], m)
    if K > 0:  # gain from thinking, and each step's own change, with paired intervals
        g = paired_bootstrap(r["ce_k"][..., 0] - r["ce_k"][..., K], m, cfg.bootstrap, cfg.seed)
        s["gain"], s["gain_ci"] = g[0], list(g[1:])
        s["step_delta"] = [paired_bootstrap(r["ce_k"][..., k] - r["ce_k"][..., k - 1], m,
                                            cfg.bootstrap, cfg.seed) for k in range(1, len(ce_k))]
        # does the energy rank the candidates it ends at? E(z_K) was computed by the chain itself
        # (as diagnose.py's final energy: the same step index K), so this costs nothing
        s["spearman_E_ce"] = spearman(r["energy_k"][..., K][m.bool()], r["ce_k"][..., K][m.bool()])
    s["ref_ce"] = masked_mean(base_ce, m)  # the shift axis' CE on this set
    gap = paired_bootstrap(r["ce_k"][..., K] - base_ce, m, cfg.bootstrap, cfg.seed)
    s["gap"], s["gap_ci"] = gap[0], list(gap[1:])
    return s


def ls_slope(pts: list) -> float:
    """Least-squares slope of y on x through points [(x, y), ...] (at least two)."""
    xs, ys = torch.tensor(pts, dtype=torch.float64).T
    xc = xs - xs.mean()
    return ((xc * (ys - ys.mean())).sum() / (xc * xc).sum().clamp_min(1e-12)).item()


def graded(names) -> list:
    """The sets of the graded shift axis: val and the corruption levels."""
    return [k for k in names if k == "val" or k.startswith("corrupt_")]


def shift_axis(rows: dict) -> dict:
    """r = exp(CE_ref(set) - CE_ref(val)) per set and the least-squares slope of gain vs ln r,
    over the graded sets (val + corrupt_*) and over all sets."""
    if "val" not in rows:
        return {"note": "no val set scored: r is undefined"}
    for s in rows.values():
        s["ln_r"] = s["ref_ce"] - rows["val"]["ref_ce"]
        s["r"] = math.exp(s["ln_r"])
    out = {}
    for name, keys in (("graded", graded(rows)), ("all", list(rows))):
        pts = [(rows[k]["ln_r"], rows[k]["gain"]) for k in keys if "gain" in rows[k]]
        if len(pts) >= 2:
            out[f"slope_{name}"] = ls_slope(pts)
            out[f"slope_{name}_sets"] = keys
    return out


def run_data_path(ck: dict) -> str:
    return str((ck.get("config") or {}).get("data", {}).get("data_path", ""))


def task_of(ck: dict) -> str | None:
    return tasks.task_name(run_data_path(ck))


def task_metrics(task, model, tok, sets, raw, K, cfg: EvalConfig, ck, device) -> dict:
    """Determined vs free positions on every set; exact match of answers (addition)."""
    out = {"name": task, "groups": {es.name: taskeval.group_rows(es, raw[es.name], task, tok.chars, K,
                                                                 cfg.bootstrap, cfg.seed) for es in sets}}
    if task == "arith" and cfg.task_lines > 0:
        val_text = tok.decode(run_data(ck, cfg).val)
        shots = taskeval.split_lines(val_text, 3)
        out["exact_match"] = {
            split: taskeval.exact_match(model, tok, lines, shots, K, cfg.bon, cfg.think_noise, device)
            for split, lines in (("val", taskeval.split_lines(val_text, cfg.task_lines + 3)[3:]),
                                 ("ood", taskeval.split_lines(tasks.ood_path(run_data_path(ck)).read_text(), cfg.task_lines)))}
    return out


def diagnostics(model, sets, K: int, cfg: EvalConfig, device, tok, ck) -> dict:
    """lab/diagnose.py on every set (K >= 1 steps needed)."""
    from lab.diagnose import collect, summarise as diag_summary, training_words
    if K == 0:
        raise ValueError("diagnose=true needs a model that thinks (think_steps > 0)")
    char = tok.meta["tokenizer"] == "char"
    words = training_words(run_data(ck, cfg), tok) if char else None
    topk = tok.vocab_size if char else cfg.rerank_topk  # char: rerank the whole vocabulary
    return {es.name: diag_summary(collect(model, es, K, batch_size=cfg.batch_size, seed=cfg.seed,
                                          device=device, topk=topk), es.mask, es, K, words)
            for es in sets}


def score_checkpoint(cfg: EvalConfig) -> dict:
    """Score every set of cfg on the checkpoint: the contents of eval.json (+ "diagnose")."""
    check_set_names(cfg.sets)
    device = rt.pick_device(cfg.device)
    path, ck, model, tok, line = load_model(cfg.checkpoint, cfg.train_out_dir, device,
                                            cfg.bpe_encoding, think_neutral=cfg.think_neutral)
    print(line)
    rt.set_threads(cfg.threads, model.num_params())
    if cfg.baseline is None and path == BUNDLED["bundled"]:  # the bundled pair
        cfg = dataclasses.replace(cfg, baseline="bundled_baseline")
    T, K = model.cfg.block_size, model.cfg.eval_think_steps
    steps = max(cfg.steps, K) if K > 0 else 0  # a plain transformer has no energy to descend
    sets, notes = builtin_sets(cfg.sets, run_data(ck, cfg), ck, tok, T, cfg.windows, cfg.seed) \
        if cfg.sets else ([], [])
    sets += [text_set(t, tok, T, cfg.windows, cfg.drop_unknown) for t in cfg.texts]
    task = task_of(ck)
    if task is not None:  # a structured task: its OOD split is scored too
        ood = text_set(str(tasks.ood_path(run_data_path(ck))), tok, T,
                       cfg.windows, False)
        sets.append(dataclasses.replace(ood, name="ood"))
    if not sets:
        raise ValueError("nothing to score: give sets=[...] or texts=[...]")
    bmodel = None
    if cfg.baseline:
        bmodel, bnote = load_baseline(cfg, ck, device)
        notes += [bnote] if bnote else []
    else:
        notes.append("no baseline=: r and EBT − ref use the EBT's own System-1 CE")
    if model.cfg.think_neutral and K > 0:
        notes.append("sharpening-neutral think steps (think_neutral): no move along z − mean(z)")
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    rows, raw, t0 = {}, {}, time.time()
    print(f"scoring {len(sets)} sets x {cfg.windows} windows, think steps 0..{steps}"
          + (f", best-of-{cfg.bon}" if cfg.bon > 1 and K > 0 else ""))
    for i, es in enumerate(sets, 1):
        r = score_windows(model, es.x, es.y, steps, trained_k=K, bon=cfg.bon, think_noise=cfg.think_noise, **kw)
        if bmodel is not None:
            b = score_windows(bmodel, es.x, es.y, 0, trained_k=0, **kw)
            ref = b["ce_s1"] if "ce_s1" in b else b["ce_k"][..., 0]
        else:
            ref = r["ce_s1"] if "ce_s1" in r else r["ce_k"][..., 0]
        rows[es.name], raw[es.name] = summarise(es, r, ref, K, cfg, math.log(2)), r
        per_set = (time.time() - t0) / i  # the ETA assumes the other sets cost the same
        print(f"scored {es.name} ({i}/{len(sets)}): {rows[es.name]['n_positions']} positions, "
              f"{time.time() - t0:.0f} s so far, about {per_set * (len(sets) - i):.0f} s left", flush=True)
    res = {"checkpoint": str(path), "baseline": cfg.baseline, "trained_k": K, "steps": steps,
           "think_neutral": model.cfg.think_neutral,
           "bits_name": "bpb" if tok.meta["tokenizer"] == "char" else "bpt", "sets": rows,
           "notes": notes}
    res["shift"] = shift_axis(rows)
    if cfg.controls and K > 0:  # is the gain more than calibration, or than adapting the weights?
        from lab.controls import score_controls
        res["controls"] = score_controls(model, bmodel, sets, rows, K, cfg, device)
    if task is not None:
        res["task"] = task_metrics(task, model, tok, sets, raw, K, cfg, ck, device)
    if cfg.probes:  # where the landscape sends over- and under-sharp starts, and noise
        from lab.startprobe import start_probes
        es = sets[0]
        res["probes"] = {"set": es.name, **start_probes(model, es.x, es.y, es.mask, steps, **kw)}
    diag = diagnostics(model, sets, K, cfg, device, tok, ck) if cfg.diagnose else None
    res["diagnose"] = diag
    return res


# ------------------------------------------------------------------------------ report
def table(res: dict) -> str:
    """Markdown: one row per set."""
    steps = res["steps"]
    ks = sorted({0, 1, 2, res["trained_k"], steps} & set(range(steps + 1)))
    head = ["set", "positions", "r"] + [f"CE k={k}" for k in ks] + \
        ["S1", "best-of-N", f"gain k=0→{res['trained_k']} [95% CI]", "EBT − ref", "Spearman(E, CE)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else "–"  # noqa: E731
    for name, s in res["sets"].items():
        gain = f"{s['gain']:+.4f} [{s['gain_ci'][0]:+.4f}, {s['gain_ci'][1]:+.4f}]" if "gain" in s else "–"
        lines.append("| " + " | ".join([name, str(s["n_positions"]), f(s.get("r"))] +
                                       [f(s["ce_k"][k]) for k in ks] + [f(s.get("ce_s1")), f(s.get("ce_bon")),
                                        gain, f"{s['gap']:+.4f}" if "gap" in s else "–",
                                        f"{s['spearman_E_ce']:+.3f}" if "spearman_E_ce" in s else "–"]) + " |")
    notes = [f"- {n}: {s['note']}" for n, s in res["sets"].items() if s["note"]] + \
        [f"- {n}" for n in res["notes"]]
    ax = res["shift"]
    if "slope_graded" in ax:
        notes.append(f"- slope of gain vs ln r: {ax['slope_graded']:+.4f} over val + corrupt_*"
                     + (f", {ax['slope_all']:+.4f} over all sets" if "slope_all" in ax else ""))
    return "\n".join(lines + [""] + notes)


def plot(results: list, path: Path) -> None:
    """results: [(label, eval result)]. Left: CE(k) - CE(0) per set (one result) or for val and
    the most shifted set (several). Right: the gain at K against ln r (the paper's Fig. 7), with
    95% intervals and each result's least-squares line over the graded sets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab10")
    for i, (label, res) in enumerate(results):
        sets = res["sets"]
        far = max(sets, key=lambda n: sets[n].get("ln_r", 0))
        shown = list(sets) if len(results) == 1 else ["val", far] if "val" in sets else [far]
        for j, name in enumerate(shown):
            s, c = sets[name], cmap((i if len(results) > 1 else j) % 10)
            ax[0].plot(range(len(s["ce_k"])), [v - s["ce_k"][0] for v in s["ce_k"]], "o-" if j == 0 or len(results) == 1 else "s--",
                       ms=3, color=c, label=f"{label} {name}".strip())
        pts = [(s["ln_r"], s["gain"], s["gain_ci"], n) for n, s in sets.items() if "gain" in s and "ln_r" in s]
        for x, g, (lo, hi), name in pts:
            ax[1].errorbar([x], [g], yerr=[[g - lo], [hi - g]], fmt="o", capsize=3, color=cmap(i % 10))
            if len(results) == 1:
                ax[1].annotate(name, (x, g), fontsize=7, xytext=(3, 3), textcoords="offset points")
        slope = res.get("shift", {}).get("slope_graded")
        on_axis = [(x, g) for x, g, _, n in pts if n in graded([n])]
        if slope is not None and on_axis:
            xs = [x for x, _ in on_axis]
            x0, y0 = sum(xs) / len(xs), sum(g for _, g in on_axis) / len(on_axis)
            ax[1].plot([min(xs), max(xs)], [y0 + slope * (min(xs) - x0), y0 + slope * (max(xs) - x0)],
                       color=cmap(i % 10), lw=1, label=f"{label} slope {slope:+.3f}".strip())
    K = results[0][1]["trained_k"]
    ax[0].set(xlabel="inference think steps k", ylabel="CE(k) − CE(0), nats", title="thinking curve")
    ax[1].set(xlabel="ln r (shift: reference CE above its val CE)", ylabel=f"gain CE(0) − CE({K}), nats",
              title="does thinking pay more under shift?")
    for a in ax:
        a.axhline(0, color="k", lw=0.6)
    save_figure(fig, ax, path)


def save_figure(fig, axes, path: Path) -> None:
    """Grid and legend (where something is labelled) on every panel, then write and close."""
    import matplotlib.pyplot as plt
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
