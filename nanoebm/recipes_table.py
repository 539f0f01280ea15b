"""One row per recipe from compare.py's shift evaluation (eval_table=recipes): mean over seeds.

Each item is one scored run (or an inference-only variant of one): its compare.py record (train
cost, learned alpha, trained K) and its scorecard result (nanoebm/scorecard.py), None for the
plain transformer. A row holds, on the same fixed windows for every recipe:
    val CE at k = 0, 1, 2, ...        and best-of-N at the trained K
    gain  g = CE(k=0) - CE(k=K)       on every set, per seed with its paired-bootstrap 95%
                                      interval (intervals do not average; the json adds the mean)
    slope of g on ln r                least squares over val + corrupt_*, per seed (and the mean)
    Spearman(E(z_K), CE(z_K))         over val positions: does the energy rank its own answers?
    start probes (eval_probes)        entropy change from 0.5x and 2x S1 starts, TV distance of
                                      the S1-start and noise-start answers (nanoebm/startprobe.py)
"""
from __future__ import annotations

import json
from pathlib import Path

from nanoebm.checkpoint import atomic_write_text
from nanoebm.scorecard import graded, ls_slope, save_figure


def mean(xs):
    """Mean of the values that exist (None when none does)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def seed_slope(res: dict):
    """One result's least-squares slope of gain on ln r over the graded sets (None: < 2 sets)."""
    sets = res["sets"]
    pts = [(sets[n]["ln_r"], sets[n]["gain"]) for n in graded(sets) if "gain" in sets[n] and "ln_r" in sets[n]]
    return ls_slope(pts) if len(pts) >= 2 else None


def seed_spearman(res: dict):
    """Spearman(E, CE) on val at K: from the thinking curve, else from the diagnostics."""
    val = res["sets"].get("val", {})
    if "spearman_E_ce" in val:
        return val["spearman_E_ce"]
    return ((res.get("diagnose") or {}).get("val") or {}).get("spearman_E_ce")


def probe_cells(probes: list[dict]) -> dict:
    """Mean over seeds of the start probes: dH (end − start entropy) from the flat (0.5x S1)
    and the sharp (2x S1) start, and the TV distance of the S1 and noise starts' answers."""
    if not probes:
        return {}
    dh = lambda p, s: p["sharpness"][s]["entropy"][1] - p["sharpness"][s]["entropy"][0]  # noqa: E731
    return {"dH_flat": mean([dh(p, "s=0.5") for p in probes]), "dH_sharp": mean([dh(p, "s=2") for p in probes]),
            "tv_paths": mean([p["path_independence"]["tv_s1_vs_noise"] for p in probes])}


def recipe_rows(items: list[dict], sets: list[str], ks: list[int]) -> list[dict]:
    """items: [{name, seed, record, eval (result | None), variant (None | {run, eval})}], in
    table order. Returns one row per name."""
    # the plain transformer is every result's reference: its val CE is their ref_ce on val
    ref_val = {it["seed"]: it["eval"]["sets"]["val"]["ref_ce"] for it in items
               if it["eval"] and it["eval"].get("baseline") and "val" in it["eval"]["sets"]}
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(it["name"], []).append(it)
    rows = []
    for name, its in by.items():
        ev = [it["eval"] for it in its if it["eval"]]
        rec = its[0]["record"]
        row = {"recipe": name, "seeds": [it["seed"] for it in its], "variant": its[0].get("variant"),
               "trained_k": rec["trained_k"],
               "ms_per_step": mean([it["record"].get("ms_per_step") for it in its])}
        if not ev:  # the plain transformer: no thinking, no energy
            row["val_ce_k"] = {0: mean([ref_val.get(s) for s in row["seeds"]])}
            rows.append(row)
            continue
        vals = [e["sets"]["val"] for e in ev if "val" in e["sets"]]
        alphas = [it["record"]["alpha"] for it in its]
        # each seed's own gain, interval and slope: a result needs both seeds to agree
        gains = {s: [e["sets"].get(s, {}).get("gain") for e in ev] for s in sets}
        slopes = [seed_slope(e) for e in ev]
        row.update({
            "val_ce_k": {k: mean([v["ce_k"][k] for v in vals if k < len(v["ce_k"])]) for k in ks},
            "val_ce_bon": mean([v.get("ce_bon") for v in vals]),
            "ln_r": {s: mean([e["sets"][s].get("ln_r") for e in ev if s in e["sets"]]) for s in sets},
            "gain": {s: mean(g) for s, g in gains.items()}, "gain_by_seed": gains,
            "gain_ci": {s: ev[0]["sets"][s]["gain_ci"] for s in sets if "gain_ci" in ev[0]["sets"].get(s, {})},
            "gain_ci_by_seed": {s: [e["sets"].get(s, {}).get("gain_ci") for e in ev] for s in sets},
            "ci_seed": its[0]["seed"], "slope_graded": mean(slopes), "slope_by_seed": slopes,
            "spearman_val": mean([seed_spearman(e) for e in ev]),
            "alpha": [mean(a) for a in zip(*alphas)]})
        row.update(probe_cells([e["probes"] for e in ev if e.get("probes")]))
        rows.append(row)
    return rows


def table(rows: list[dict], sets: list[str], ks: list[int], bon: int) -> str:
    """Markdown: one row per recipe, val CE (nats) by k, best-of-N, gains with intervals, the
    slope on ln r, the verifier correlation and the training cost."""
    head = (["recipe", "seeds", "K"] + [f"val k={k}" for k in ks] + [f"best-of-{bon} at K"]
            + [f"gain {s} [95% CI]" for s in sets]
            + ["slope g~ln r (val+corrupt)", "Spearman(E, CE) val", "dH from 0.5x / 2x S1",
               "TV(S1, noise start)", "ms/step", "alpha"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v, fmt=".4f": "–" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        cells = [r["recipe"], ",".join(map(str, r["seeds"])), str(r["trained_k"])]
        cells += [f(r["val_ce_k"].get(k)) for k in ks] + [f(r.get("val_ce_bon"))]
        for s in sets:  # one "gain [interval]" per seed; "–" for the plain transformer
            gs, cis = r.get("gain_by_seed", {}).get(s, [None]), r.get("gain_ci_by_seed", {}).get(s, [None])
            cells.append(" / ".join(f(g, "+.4f") + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
                                    for g, ci in zip(gs, cis)))
        cells += [" / ".join(f(b, "+.4f") for b in r.get("slope_by_seed", [None])), f(r.get("spearman_val"), "+.3f"),
                  f"{f(r.get('dH_flat'), '+.3f')} / {f(r.get('dH_sharp'), '+.3f')}",
                  f(r.get("tv_paths"), ".3f"), f(r["ms_per_step"], ".0f"), "/".join(f"{a:.3g}" for a in r.get("alpha") or []) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Val CE in nats on the fixed eval windows, mean over the seeds listed. gain = CE(k=0) − "
             "CE(k=K), > 0 where thinking helped, per seed (in the order listed) with its 95% interval "
             "(paired bootstrap over windows). slope: least squares of gain on ln r over val + "
             "corrupt_*, per seed. Spearman over val positions at k=K (> 0: lower energy, lower CE). dH: "
             "entropy change over the probe chain from 0.5x and 2x the S1 logits (a calibrating "
             "landscape: − / +; pure sharpening: − / −); TV: distance between the answers from the S1 "
             "and a noise start (0: path independent). ms/step: each run's own training speed, comparable "
             "only between runs trained side by side (the machine is shared)."]
    notes += [f"- {r['recipe']}: the checkpoint of {r['variant']['run']}, scored with "
              + ", ".join(f"{k}={v}" for k, v in r["variant"]["eval"].items()) for r in rows if r["variant"]]
    return "\n".join(lines + notes)


def plot(rows: list[dict], path: Path) -> None:
    """Left: each recipe's val thinking curve (dashed: the plain transformer). Right: its gain
    against ln r (mean over seeds) with the least-squares line over val + corrupt_*."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for i, r in enumerate(rows):
        c = cmap(i % cmap.N)
        if "gain" not in r:
            if r["val_ce_k"].get(0) is not None:
                ax[0].axhline(r["val_ce_k"][0], ls="--", lw=1, color=c, label=r["recipe"])
            continue
        ks = [k for k, v in r["val_ce_k"].items() if v is not None]
        ax[0].plot(ks, [r["val_ce_k"][k] for k in ks], "o-", ms=3, color=c, label=r["recipe"])
        pts = [(r["ln_r"][s], g) for s, g in r["gain"].items() if g is not None and r["ln_r"].get(s) is not None]
        ax[1].plot([x for x, _ in pts], [g for _, g in pts], "o", ms=4, color=c)
        on_axis = [(r["ln_r"][s], r["gain"][s]) for s in graded(r["gain"])
                   if r["gain"][s] is not None and r["ln_r"].get(s) is not None]
        if len(on_axis) >= 2:  # the line of the mean points (the table's slope is the mean of seeds')
            xs, b = [x for x, _ in on_axis], ls_slope(on_axis)
            x0, y0 = sum(xs) / len(xs), sum(g for _, g in on_axis) / len(on_axis)
            ax[1].plot([min(xs), max(xs)], [y0 + b * (min(xs) - x0), y0 + b * (max(xs) - x0)], color=c,
                       lw=1, label=f"{r['recipe']} {b:+.3f}")
    ax[0].set(xlabel="inference think steps k", ylabel="val CE, nats", title="val thinking curve")
    ax[1].set(xlabel="ln r (shift: baseline CE above its val CE)", ylabel="gain CE(0) − CE(K), nats",
              title="gain under shift (line: least squares over val + corrupt_*)")
    ax[1].axhline(0, color="k", lw=0.6)
    save_figure(fig, ax, path)


def write(items: list[dict], sets: list[str], ks: list[int], bon: int, stem: Path) -> str:
    """<stem>.json (the rows), .md (the table) and .png; returns the markdown."""
    rows = recipe_rows(items, sets, ks)
    md = table(rows, sets, ks, bon)
    atomic_write_text(Path(f"{stem}.json"), json.dumps({"sets": sets, "ks": ks, "rows": rows}, indent=1))
    atomic_write_text(Path(f"{stem}.md"), md + "\n")
    plot(rows, Path(f"{stem}.png"))
    return md

