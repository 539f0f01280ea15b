"""Score a checkpoint's thinking curve on any text and under graded shift away from its training
text: does thinking pay more the further the data is from training (the EBT paper, Fig. 7)?

    uv run python evaluate.py                                     # newest run under out_ebt/
    uv run python evaluate.py checkpoint=out_ebt/final.pt baseline=out_base/final.pt
    uv run python evaluate.py "texts=[other.txt]" drop_unknown=true "sets=[val]"
    uv run python evaluate.py diagnose=true                       # + why steps help or hurt

Every set is a fixed list of windows, and every k is scored on the same windows from the same
start (paired). Writes eval.json, eval.md, eval.png (and diagnose.json/md) into out_dir.
Options live in nanoebm/config.py (EvalConfig).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from nanoebm import runtime as rt
from nanoebm.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint
from nanoebm.config import DataConfig, EvalConfig, apply_cli_shims, register_configs
from nanoebm.evaluate import masked_mean, paired_bootstrap, score_windows
from nanoebm.generate import resolve_tokenizer
from nanoebm.shift import builtin_sets, check_set_names, text_set


def load_model(path, device, bpe_encoding=None):
    """(checkpoint dict, model in eval mode, its tokenizer)."""
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck, device).eval()
    return ck, model, resolve_tokenizer(ck.get("meta"), model.cfg.vocab_size, None, bpe_encoding)


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
    bck, bmodel, _ = load_model(cfg.baseline, device, cfg.bpe_encoding)
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
    s["ref_ce"] = masked_mean(base_ce, m)  # the shift axis' CE on this set
    gap = paired_bootstrap(r["ce_k"][..., K] - base_ce, m, cfg.bootstrap, cfg.seed)
    s["gap"], s["gap_ci"] = gap[0], list(gap[1:])
    return s


def shift_axis(rows: dict) -> dict:
    """r = exp(CE_ref(set) - CE_ref(val)) per set and the least-squares slope of gain vs ln r,
    over the graded sets (val + corrupt_*) and over all sets."""
    if "val" not in rows:
        return {"note": "no val set scored: r is undefined"}
    for s in rows.values():
        s["ln_r"] = s["ref_ce"] - rows["val"]["ref_ce"]
        s["r"] = math.exp(s["ln_r"])
    out = {}
    for name, keys in (("graded", [k for k in rows if k == "val" or k.startswith("corrupt_")]),
                       ("all", list(rows))):
        pts = [(rows[k]["ln_r"], rows[k]["gain"]) for k in keys if "gain" in rows[k]]
        if len(pts) >= 2:
            xs, ys = torch.tensor(pts, dtype=torch.float64).T
            xc = xs - xs.mean()
            out[f"slope_{name}"] = ((xc * (ys - ys.mean())).sum() / (xc * xc).sum().clamp_min(1e-12)).item()
            out[f"slope_{name}_sets"] = keys
    return out


def table(res: dict) -> str:
    """Markdown: one row per set."""
    steps = res["steps"]
    ks = sorted({0, 1, 2, res["trained_k"], steps} & set(range(steps + 1)))
    head = ["set", "positions", "r"] + [f"CE k={k}" for k in ks] + \
        ["S1", "best-of-N", f"gain k=0→{res['trained_k']} [95% CI]", "EBT − ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else "–"  # noqa: E731
    for name, s in res["sets"].items():
        gain = f"{s['gain']:+.4f} [{s['gain_ci'][0]:+.4f}, {s['gain_ci'][1]:+.4f}]" if "gain" in s else "–"
        lines.append("| " + " | ".join([name, str(s["n_positions"]), f(s.get("r"))] +
                                       [f(s["ce_k"][k]) for k in ks] + [f(s.get("ce_s1")), f(s.get("ce_bon")),
                                        gain, f"{s['gap']:+.4f}" if "gap" in s else "–"]) + " |")
    notes = [f"- {n}: {s['note']}" for n, s in res["sets"].items() if s["note"]] + \
        [f"- {n}" for n in res["notes"]]
    ax = res["shift"]
    if "slope_graded" in ax:
        notes.append(f"- slope of gain vs ln r: {ax['slope_graded']:+.4f} over val + corrupt_*"
                     + (f", {ax['slope_all']:+.4f} over all sets" if "slope_all" in ax else ""))
    return "\n".join(lines + [""] + notes)


def plot(res: dict, path: Path) -> None:
    """Left: CE(k) - CE(0) per set. Right: the gain at K against ln r (the paper's Fig. 7)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in res["sets"].items():
        ax[0].plot(range(len(s["ce_k"])), [c - s["ce_k"][0] for c in s["ce_k"]], "o-", ms=3, label=name)
        if "gain" in s and "ln_r" in s:
            lo, hi = s["gain_ci"]
            ax[1].errorbar([s["ln_r"]], [s["gain"]], yerr=[[s["gain"] - lo], [hi - s["gain"]]], fmt="o", capsize=3)
            ax[1].annotate(name, (s["ln_r"], s["gain"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax[0].set(xlabel="inference think steps k", ylabel="CE(k) − CE(0), nats", title="thinking curve per set")
    ax[1].set(xlabel="ln r (shift: reference CE above its val CE)", ylabel=f"gain CE(0) − CE({res['trained_k']}), nats",
              title="does thinking pay more under shift?")
    for a in ax:
        a.axhline(0, color="k", lw=0.6)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate(cfg: EvalConfig) -> dict:
    """Score every set, then write eval.{json,md,png} (and diagnose.*): nothing half-way."""
    check_set_names(cfg.sets)
    if cfg.steps < 0 or cfg.windows < 1 or cfg.batch_size < 1:
        raise ValueError("steps must be >= 0, windows and batch_size >= 1")
    device = rt.pick_device(cfg.device)
    path = Path(cfg.checkpoint or latest_checkpoint(cfg.train_out_dir))
    ck, model, tok = load_model(path, device, cfg.bpe_encoding)
    T, K = model.cfg.block_size, model.cfg.think_steps + model.cfg.think_steps_random
    steps = max(cfg.steps, K)
    sets, notes = builtin_sets(cfg.sets, run_data(ck, cfg), ck, tok, T, cfg.windows, cfg.seed) \
        if cfg.sets else ([], [])
    sets += [text_set(t, tok, T, cfg.windows, cfg.drop_unknown) for t in cfg.texts]
    if not sets:
        raise ValueError("nothing to score: give sets=[...] or texts=[...]")
    bmodel = None
    if cfg.baseline:
        bmodel, bnote = load_baseline(cfg, ck, device)
        notes += [bnote] if bnote else []
    else:
        notes.append("no baseline=: r and EBT − ref use the EBT's own System-1 CE")
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    rows, raw = {}, {}
    for es in sets:
        r = score_windows(model, es.x, es.y, steps, trained_k=K, bon=cfg.bon, bon_noise=cfg.bon_noise, **kw)
        if bmodel is not None:
            b = score_windows(bmodel, es.x, es.y, 0, trained_k=0, **kw)
            ref = b["ce_s1"] if "ce_s1" in b else b["ce_k"][..., 0]
        else:
            ref = r["ce_s1"] if "ce_s1" in r else r["ce_k"][..., 0]
        rows[es.name], raw[es.name] = summarise(es, r, ref, K, cfg, math.log(2)), r
        print(f"scored {es.name}: {rows[es.name]['n_positions']} positions")
    res = {"checkpoint": str(path), "baseline": cfg.baseline, "trained_k": K, "steps": steps,
           "bits_name": "bpb" if tok.meta["tokenizer"] == "char" else "bpt", "sets": rows,
           "notes": notes}
    res["shift"] = shift_axis(rows)
    diag = diagnostics(model, sets, K, cfg, device, tok, ck) if cfg.diagnose else None
    out = Path(cfg.out_dir) if cfg.out_dir else path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    md = table(res)
    write_atomic(out / "eval.json", json.dumps(res, indent=1))
    write_atomic(out / "eval.md", md + "\n")
    plot(res, out / "eval.png")
    if diag is not None:
        from nanoebm.diagnose import report
        write_atomic(out / "diagnose.json", json.dumps(diag, indent=1))
        write_atomic(out / "diagnose.md", report(diag) + "\n")
    print(md)
    print(f"wrote {out / 'eval.json'}, eval.md, eval.png" + (", diagnose.json, diagnose.md" if diag else ""))
    return {"out_dir": str(out), **res, "diagnose": diag}


def diagnostics(model, sets, K: int, cfg: EvalConfig, device, tok, ck) -> dict:
    """nanoebm/diagnose.py on every set (K >= 1 steps needed)."""
    from nanoebm.diagnose import collect, summarise as diag_summary, training_words
    if K == 0:
        raise ValueError("diagnose=true needs a model that thinks (think_steps > 0)")
    char = tok.meta["tokenizer"] == "char"
    words = training_words(run_data(ck, cfg), tok) if char else None
    topk = tok.vocab_size if char else cfg.rerank_topk  # char: rerank the whole vocabulary
    return {es.name: diag_summary(collect(model, es, K, batch_size=cfg.batch_size, seed=cfg.seed,
                                          device=device, topk=topk), es.mask, es, K, words)
            for es in sets}


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg) -> None:
    try:
        evaluate(OmegaConf.to_object(cfg))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    apply_cli_shims()
    register_configs()
    main()
