"""What the think steps do from starts other than System 1: two probes of the landscape.

    sharpness response   start from s * z_S1 for s = 0.5 (flatter than S1), 1, 2 (sharper) and
                         descend K steps: a landscape whose minimum is the calibrated answer
                         lowers the entropy from s = 0.5 and raises it from s = 2 (it pulls
                         both back toward the answer); a step that only sharpens lowers it
                         from every start.
    path independence    descend `steps` steps from S1 and from noise N(0, think_init_std^2):
                         the total-variation distance between the two final distributions (0:
                         the answer does not depend on where thinking started), and each CE.

Both use plain descent (no noise), the windows' scored positions, and `lab.evaluate probes=true`
writes them into eval.json under "probes".
"""
from __future__ import annotations

import torch

from lab.scoring import masked_mean, window_batches
from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.think import entropy, initial_logits, think

SCALES = (0.5, 1.0, 2.0)


@torch.no_grad()
def chain_ends(model: EBT, x: torch.Tensor, y: torch.Tensor, steps: int,
               gen: torch.Generator) -> dict:
    """Start and end logits (B, T, V) of `steps` plain think steps from each probe start."""
    ctx = model.context(x)
    s1 = initial_logits(model, ctx, x.shape[1], mode="s1")  # (B, T, V)
    starts = {f"s={s:g}": s * s1 for s in SCALES}
    starts["noise"] = initial_logits(model, ctx, x.shape[1], mode="noise", generator=gen)
    return {name: (z0, think(model, ctx, z0, steps, noise=0.0, generator=gen).final)
            for name, z0 in starts.items()}


def start_probes(model: EBT, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, steps: int,
                 *, batch_size: int = 32, seed: int = 0, device="cpu") -> dict:
    """Mean entropy and CE at the start and end of each probe chain over the windows x, y
    (N, T) and their scored positions mask (N, T), and the S1-vs-noise TV distance."""
    if not (model.has_s1 and model.cfg.has_energy):
        raise ValueError("start probes need a model with an energy and an S1 head")
    was_training = model.training
    model.eval()
    acc: dict[str, list] = {}
    for xb, yb, gen in window_batches(x, y, batch_size, seed, device):
        ends = chain_ends(model, xb, yb, steps, gen)
        for name, (z0, zk) in ends.items():
            for tag, z in (("start", z0), ("end", zk)):
                acc.setdefault(f"{name} H {tag}", []).append(entropy(torch.softmax(z, -1)).cpu())
                acc.setdefault(f"{name} CE {tag}", []).append(ce(z, yb, "none").view(yb.shape).cpu())
        p_s1, p_noise = (torch.softmax(ends[k][1], -1) for k in ("s=1", "noise"))
        acc.setdefault("tv", []).append(0.5 * (p_s1 - p_noise).abs().sum(-1).cpu())  # (B, T)
    model.train(was_training)
    m = {k: masked_mean(torch.cat(v).float(), mask) for k, v in acc.items()}
    return {"steps": steps,
            "sharpness": {f"s={s:g}": {"entropy": [m[f"s={s:g} H start"], m[f"s={s:g} H end"]],
                                       "ce": [m[f"s={s:g} CE start"], m[f"s={s:g} CE end"]]}
                          for s in SCALES},
            "path_independence": {"tv_s1_vs_noise": m["tv"],
                                  "ce_end_s1": m["s=1 CE end"], "ce_end_noise": m["noise CE end"]}}


def report(p: dict) -> str:
    """Markdown lines for the probes."""
    lines = [f"start probes ({p['steps']} plain steps): entropy start → end, CE start → end"]
    for name, r in p["sharpness"].items():
        (h0, h1), (c0, c1) = r["entropy"], r["ce"]
        lines.append(f"- from {name} · z_S1: H {h0:.3f} → {h1:.3f} ({h1 - h0:+.3f}), "
                     f"CE {c0:.4f} → {c1:.4f}")
    pi = p["path_independence"]
    lines.append(f"- path independence: TV(S1 start, noise start) after {p['steps']} steps "
                 f"{pi['tv_s1_vs_noise']:.3f}; CE {pi['ce_end_s1']:.4f} vs {pi['ce_end_noise']:.4f}")
    return "\n".join(lines)
