"""Ship a trained run in checkpoints/: half-precision weights only, scored, with its record.

    uv run python -m lab.bundle results/runs/ebt_s1337/final.pt ebt --commit 16ee6ad
    uv run python -m lab.bundle results/runs/baseline_s1337/final.pt baseline --commit 16ee6ad

writes checkpoints/shakespeare_char_{ebt,baseline}.pt (weights as float16, the model config, the
vocabulary, the run's config and its sampler record: no optimizer, no random streams) and its row of
checkpoints/README.md: the command, commit, seed, hardware, training time, the sha256 and the
val bpb of the *bundled* weights (float16 rounding included) on fixed val windows (SCORE), which
tests/test_bundled.py recomputes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
from pathlib import Path

import torch

from nanoebm.checkpoint import BUNDLED, atomic_save, atomic_write_text, load_checkpoint, model_from_checkpoint
from nanoebm.losses import thinking_curve
from lab.config import EvalConfig
from lab.scorecard import run_data
from lab.scoring import best_of_n_loss

README = BUNDLED["bundled"].parent / "README.md"
SCORE = dict(batches=20, batch_size=12, seed=4242, bon=4, think_noise=0.5)  # the fixed val windows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score(ck: dict) -> dict:
    """Val CE (nats/char; README records bits) of a checkpoint on SCORE's fixed windows: System 1,
    after the trained think steps, and best-of-4 chains (EBT only)."""
    torch.manual_seed(0)
    model = model_from_checkpoint(ck).eval()
    data = run_data(ck, EvalConfig())  # the run's own corpus, as lab.evaluate reads it
    g = torch.Generator().manual_seed(SCORE["seed"])
    T = model.cfg.block_size
    batches = [data.get_batch("val", SCORE["batch_size"], T, g) for _ in range(SCORE["batches"])]
    K = model.cfg.eval_think_steps
    curve = thinking_curve(model, batches, K, seed=SCORE["seed"])
    out = {"s1": curve.get("loss_s1", curve["loss_k"][0]), "think": curve["loss_k"][-1]}
    if K > 0:
        out["bon"] = best_of_n_loss(model, batches, K, SCORE["bon"], SCORE["think_noise"],
                                    seed=SCORE["seed"])
    return out


def bundle(run: Path, kind: str, commit: str) -> dict:
    """Write the half-precision file, score it and return its README row's fields."""
    ck = load_checkpoint(run)
    half = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    out = BUNDLED["bundled" if kind == "ebt" else "bundled_baseline"]
    out.parent.mkdir(exist_ok=True)
    atomic_save({"model": half, "model_config": ck["model_config"], "meta": ck["meta"],
                 "config": ck["config"], "step": ck["step"],
                 "sampler": ck["sampler"]}, out)  # which windows it trained on: train_seen/unseen
    rows = [json.loads(r) for r in (run.resolve().parent / "metrics.jsonl").read_text().splitlines()]
    minutes = max(r.get("elapsed_s") or 0 for r in rows) / 60
    think = ck["model_config"]["think_steps"] > 0
    cmd = "uv run python train.py experiment=cpu" + ("" if think else " model.think_steps=0")
    return {"file": out.name, "command": f"`{cmd}`", "commit": commit,
            "seed": ck["config"]["train"]["seed"], "steps": ck["step"],
            "hardware": f"{platform.machine()} CPU, 1 thread, torch {torch.__version__.split('+')[0]}",
            "minutes": f"{minutes:.1f}",
            **{k: f"{v / math.log(2):.4f}" for k, v in score(load_checkpoint(out)).items()},
            "sha256": sha256(out)}


COLUMNS = ["file", "command", "commit", "seed", "steps", "hardware", "minutes", "s1", "think", "bon",
           "sha256"]
HEADER = ("| file | command | commit | seed | steps | hardware | training (min) | val bpb S1 | "
          "val bpb after thinking | val bpb best-of-4 | sha256 |")


def recorded() -> dict:
    """file name -> {column: value} from checkpoints/README.md's table."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and cells[0].endswith(".pt"):
            rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows


def write_row(row: dict) -> None:
    """Insert or replace this file's row of the table in checkpoints/README.md."""
    text = README.read_text() if README.exists() else f"{HEADER}\n|{'---|' * len(COLUMNS)}\n"
    line = "| " + " | ".join(str(row.get(c, "–")) for c in COLUMNS) + " |"
    pattern = re.compile(rf"^\| {re.escape(row['file'])} \|.*$", re.M)
    text = pattern.sub(line, text) if pattern.search(text) else text.replace(
        f"|{'---|' * len(COLUMNS)}\n", f"|{'---|' * len(COLUMNS)}\n{line}\n", 1)
    atomic_write_text(README, text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run's final.pt")
    ap.add_argument("kind", choices=["ebt", "baseline"])
    ap.add_argument("--commit", required=True, help="the commit the run was trained at")
    a = ap.parse_args()
    row = bundle(a.run, a.kind, a.commit)
    write_row(row)
    print(f"wrote checkpoints/{row['file']} ({row['sha256'][:12]}...), val bpb "
          + " / ".join(f"{k} {row[k]}" for k in ("s1", "think", "bon") if k in row))
