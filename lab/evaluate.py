"""Score a checkpoint's thinking curve on any text and under graded shift away from its training
text: does thinking pay more the further the data is from training (the EBT paper, Fig. 7)?

    uv run python -m lab.evaluate                                     # newest run under out_ebt/
    uv run python -m lab.evaluate checkpoint=out_ebt/final.pt baseline=out_base/final.pt
    uv run python -m lab.evaluate "texts=[other.txt]" drop_unknown=true "sets=[val]"
    uv run python -m lab.evaluate diagnose=true                       # + why steps help or hurt

Every set is a fixed list of windows, and every k is scored on the same windows from the same
start (paired). Writes eval.json, eval.md, eval.png (and diagnose.json/md) into out_dir.
Options live in nanoebm/config.py (EvalConfig).
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from lab import taskeval
from nanoebm.checkpoint import atomic_write_text
from lab.config import EvalConfig
from nanoebm.cli import apply_cli_shims, register_configs
from lab.scorecard import plot, score_checkpoint, table


def evaluate(cfg: EvalConfig) -> dict:
    """Score every set, then write eval.{json,md,png} (and diagnose.*): nothing half-way."""
    res = score_checkpoint(cfg)
    diag = res.pop("diagnose")
    path = Path(res["checkpoint"])
    default = Path(cfg.train_out_dir) / "eval_bundled" if path.parent.name == "checkpoints" \
        else path.parent / "eval"  # the bundled models' folder stays as shipped
    out = Path(cfg.out_dir) if cfg.out_dir else default
    out.mkdir(parents=True, exist_ok=True)
    md = table(res) + (f"\n\n{taskeval.table(res)}" if "task" in res else "")
    if "controls" in res:
        from lab import controls
        md += f"\n\n{controls.table(res)}"
    if "probes" in res:
        from lab.startprobe import report as probe_report
        md += f"\n\n{probe_report(res['probes'])} on {res['probes']['set']}"
    atomic_write_text(out / "eval.json", json.dumps(res, indent=1))
    atomic_write_text(out / "eval.md", md + "\n")
    plot([("", res)], out / "eval.png")
    if "controls" in res:
        controls.plot([("", res)], out / "controls.png")
    if diag is not None:
        from lab.diagnose import report
        atomic_write_text(out / "diagnose.json", json.dumps(diag, indent=1))
        atomic_write_text(out / "diagnose.md", report(diag) + "\n")
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
    apply_cli_shims(schema=EvalConfig)
    register_configs({"base_eval": EvalConfig})
    main()
