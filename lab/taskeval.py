"""Task metrics for the structured character tasks (lab/tasks.py): where the next character
is *determined* by structure (Dyck: which bracket closes; addition: the answer digits), is it
easier to verify a candidate than to produce it?

    determined / free   CE and argmax accuracy at every think step k, the gain from thinking
                        with its paired interval, and best-of-N, on each group of positions
    exact match         addition only: whole answers `c` of `a+b=` decoded greedily, System 1,
                        after thinking, and best-of-N by final energy
"""
from __future__ import annotations

import torch

from lab import tasks
from lab.scoring import masked_mean, paired_bootstrap
from nanoebm.generate import generate


def group_rows(es, r: dict, task: str, chars: list, K: int, n_boot: int, seed: int) -> dict:
    """{"determined": row, "free": row} for one scored set (score_windows' per-position r)."""
    det = tasks.determined_mask(task, es.y, chars) & es.mask  # (N, T)
    out = {}
    for name, m in (("determined", det), ("free", es.mask & ~det)):
        n_k = r["ce_k"].shape[-1]
        row = {"n_positions": int(m.sum()),
               "ce_k": [masked_mean(r["ce_k"][..., k], m) for k in range(n_k)],
               "acc_k": [masked_mean(r["hit_k"][..., k].float(), m) for k in range(n_k)]}
        if K > 0 and m.any():
            g = paired_bootstrap(r["ce_k"][..., 0] - r["ce_k"][..., K], m, n_boot, seed)
            row["gain"], row["gain_ci"] = g[0], list(g[1:])
            row["step_delta"] = [paired_bootstrap(r["ce_k"][..., k] - r["ce_k"][..., k - 1], m,
                                                  n_boot, seed) for k in range(1, n_k)]
        if "ce_bon" in r:
            row["ce_bon"], row["acc_bon"] = masked_mean(r["ce_bon"], m), masked_mean(r["hit_bon"].float(), m)
        out[name] = row
    return out


def split_lines(text: str, n: int) -> list[str]:
    """Up to n whole lines of a task text (the first, possibly cut, line dropped)."""
    lines = [ln for ln in text.split("\n")[1:-1] if ln]
    return lines[:n]


@torch.no_grad()
def exact_match(model, tok, lines: list[str], shots: list[str], K: int, bon: int, noise: float,
                device) -> dict:
    """Greedy answers to `a+b=` after a few solved lines: System 1 (no thinking), after K think
    steps, and best-of-bon chains picked by final energy. Fraction of exactly right answers."""
    prefix = "\n" + "\n".join(shots) + "\n"
    variants = {"s1": dict(use_thinking=False)}
    if K > 0:
        variants["think"] = dict(use_thinking=True)
        if bon > 1:
            variants["bon"] = dict(use_thinking=True, n_candidates=bon, think_noise=noise)
    out = {"n": len(lines)}
    width = max(len(ln) - ln.index("=") for ln in lines)  # the longest answer and its newline
    for name, kw in variants.items():
        gen = torch.Generator(device=device).manual_seed(0)

        def complete(prompt: str) -> str:
            idx = torch.tensor([tok.encode(prompt)], device=device)  # (1, T)
            return tok.decode(generate(model, idx, width, generator=gen, **kw).tokens[0].tolist())
        out[name] = tasks.arith_exact_match(complete, lines, prefix)["exact_match"]
    return out


def table(res: dict) -> str:
    """Markdown: determined vs free positions per set, and exact match."""
    K = res["trained_k"]
    lines = ["| set | positions | n | CE k=0 | CE k=K | gain [95% CI] | acc k=0 | acc k=K | CE best-of-N | acc best-of-N |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else "–"  # noqa: E731
    for set_name, groups in res["task"]["groups"].items():
        for g, row in groups.items():
            gain = f"{row['gain']:+.4f} [{row['gain_ci'][0]:+.4f}, {row['gain_ci'][1]:+.4f}]" if "gain" in row else "–"
            lines.append(f"| {set_name} | {g} | {row['n_positions']} | {f(row['ce_k'][0])} | {f(row['ce_k'][K])} | "
                         f"{gain} | {f(row['acc_k'][0])} | {f(row['acc_k'][K])} | {f(row.get('ce_bon'))} | "
                         f"{f(row.get('acc_bon'))} |")
    em = res["task"].get("exact_match")
    if em:
        lines += ["", "exact match of whole answers (greedy): " + "; ".join(
            f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if k != "n") + f" (n={d['n']})"
            for split, d in em.items())]
    return "\n".join(lines)
