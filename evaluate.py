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

import json
import os
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from nanoebm import taskeval
from nanoebm.config import EvalConfig, apply_cli_shims, register_configs
from nanoebm.scorecard import score_checkpoint


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
    res = score_checkpoint(cfg)
    diag = res.pop("diagnose")
    path = Path(res["checkpoint"])
    out = Path(cfg.out_dir) if cfg.out_dir else path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    md = table(res) + (f"\n\n{taskeval.table(res)}" if "task" in res else "")
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
