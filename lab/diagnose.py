"""Why a think step helps or hurts: diagnostics on the windows of one evaluation set.

    harm split      D_t = CE_t(z_K) - CE_t(z_0), averaged where the S1 argmax is right / wrong,
                    over S1-entropy quintiles, and (char) inside words the training split never
                    contains vs words it does
    temperature     per k, one temperature T_k fitted on half the windows; CE of z_k / T_k on the
                    other half. If thinking only sharpens, a tuned temperature undoes the gain
                    (or the harm) and the tuned curve is flat in k
    step geometry   cos(dE/dz at step k, at step k+1) and the share of each step's move
                    dz_k along the sharpening direction u = z_k - mean_V(z_k): (dz.u)^2/|dz|^2|u|^2
    verifier        Spearman rank correlation of E(z_K) with CE(z_K) over positions, and the CE
                    of the reranked distribution  p'(v) ~ p_S1(v) exp(-beta E(x, onehot v))
                    over the whole vocabulary (or S1's top-k, the rest keeping its S1 mass),
                    beta fitted on one half of the windows and scored on the other
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think

TEMPS = torch.logspace(math.log10(0.25), math.log10(4.0), 41)  # T_k search grid
BETA_GRID = torch.linspace(-4, 4, 81)  # beta * std(E): the rerank strength search grid


def centred(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(-1, keepdim=True)


def energy_grad(model: EBT, ctx, z: torch.Tensor, step: int) -> torch.Tensor:
    """dE/dz (B, T, V) at logits z: each position's own gradient (positions don't interact)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        E = model.energy(ctx, torch.softmax(z / model.cfg.softmax_temperature, -1), step=step, fused=True)
        return torch.autograd.grad(E.sum(), z)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position cosine over the vocabulary (B, T)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-20)


def candidate_energies(model: EBT, ctx, s1: torch.Tensor, topk: int, step: int):
    """(E (B, T, C), cands (B, T, C)): energies of one-hot candidates, the whole vocabulary
    when it has at most topk tokens, else S1's topk most likely tokens."""
    B, T, V = s1.shape
    if V <= topk:
        cands = torch.arange(V, device=s1.device).expand(B, T, V)
    else:
        cands = s1.topk(topk, -1).indices  # (B, T, C)
    E = torch.stack([model.energy_of_tokens(ctx, cands[..., j], step=step)
                     for j in range(cands.shape[-1])], -1)  # (B, T, C)
    return E, cands


def rerank_ce(s1: torch.Tensor, E: torch.Tensor, cands: torch.Tensor, y: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Per-position CE (B, T) of p'(v) = P_S1(C) softmax_C(log p_S1 - beta E)(v) for v in C, p_S1
    elsewhere; C = cands. With C = the whole vocabulary, p' = softmax(log p_S1 - beta E)."""
    logp = torch.log_softmax(s1.float(), -1)  # (B, T, V)
    lp_c = logp.gather(-1, cands)  # (B, T, C)
    mass = torch.logsumexp(lp_c, -1, keepdim=True)  # log P_S1(C)
    new_c = mass + torch.log_softmax(lp_c - beta * E, -1)  # (B, T, C) reranked log-probs
    is_t = cands == y[..., None]  # (B, T, C)
    in_c = is_t.any(-1)
    lp_y = torch.where(in_c, (new_c * is_t).sum(-1), logp.gather(-1, y[..., None])[..., 0])
    return -lp_y


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by order: continuous values here)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp_min(1e-20)).item()


def word_flags(text: str, train_words: set) -> tuple[np.ndarray, np.ndarray]:
    """(in_word, novel) per character of text: letters of a word, and of a word that never
    occurs in the training split."""
    in_word, novel = np.zeros(len(text), bool), np.zeros(len(text), bool)
    for m in re.finditer(r"[^\W\d_]+", text):
        in_word[m.start():m.end()] = True
        novel[m.start():m.end()] = m.group() not in train_words
    return in_word, novel


@torch.no_grad()
def collect(model: EBT, eset, K: int, *, batch_size: int, seed: int, device, topk: int) -> dict:
    """One pass over the set's windows, keeping what every diagnostic needs (on the CPU)."""
    keep: dict[str, list] = {}
    add = lambda k, v: keep.setdefault(k, []).append(v.float().cpu())  # noqa: E731
    for i in range(0, len(eset.x), batch_size):
        x, y = eset.x[i:i + batch_size].to(device), eset.y[i:i + batch_size].to(device)
        mb = eset.mask[i:i + batch_size].to(device).float()  # (b, T) scored positions
        gen = torch.Generator(device=x.device).manual_seed(seed + i // batch_size)
        ctx = model.context(x)
        z0 = initial_logits(model, ctx, x.shape[1], generator=gen)
        out = think(model, ctx, z0, K, noise=0.0, final_energy=True, generator=gen)
        zs = [z0] + out.logits
        add("ce0", ce(z0, y, reduction="none").view(y.shape))
        add("ceK", ce(zs[-1], y, reduction="none").view(y.shape))
        add("E_final", out.final_energy)
        # per window and temperature: sum over scored positions of CE(z_k / T)  (b, K+1, G)
        add("temp_ce", torch.stack([torch.stack([(ce(z / t, y, reduction="none").view(y.shape) * mb).sum(1)
                                                 for t in TEMPS], -1) for z in zs], 1))
        grads = [energy_grad(model, ctx, z, k) for k, z in enumerate(zs)]
        add("grad_cos", torch.stack([cosine(grads[k], grads[k + 1]) for k in range(K)], -1))
        moves = [centred(zs[k + 1] - zs[k]) for k in range(K)]
        add("sharpen", torch.stack([cosine(m, centred(zs[k])) for k, m in enumerate(moves)], -1))
        if model.has_s1:
            s1 = ctx.s1_logits
            add("s1_right", (s1.argmax(-1) == y).float())
            add("s1_entropy", -(torch.softmax(s1, -1) * torch.log_softmax(s1, -1)).sum(-1))
            E, cands = candidate_energies(model, ctx, s1, topk, step=K)
            keep.setdefault("rerank", []).append((s1.cpu(), E.cpu(), cands.cpu(), y.cpu()))
    out = {k: torch.cat(v) for k, v in keep.items() if k != "rerank"}
    out["rerank"] = keep.get("rerank", [])
    return out


def fit_rerank(parts: list, mask: torch.Tensor, n_fit_windows: int) -> dict:
    """beta fitted on windows [0, n_fit) of the kept batches, CE reported on the rest."""
    s1 = torch.cat([p[0] for p in parts]).float()
    E, cands, y = (torch.cat([p[j] for p in parts]) for j in (1, 2, 3))
    scale = E.std().clamp_min(1e-8).item()
    fit, hold = slice(0, n_fit_windows), slice(n_fit_windows, None)
    def mean_ce(sl, beta):  # noqa: E306
        return (rerank_ce(s1[sl], E[sl], cands[sl], y[sl], beta) * mask[sl]).sum().item() / max(int(mask[sl].sum()), 1)
    betas = (BETA_GRID / scale).tolist()
    beta = min(betas, key=lambda b: mean_ce(fit, b))
    return {"beta": beta, "beta_x_std_E": beta * scale, "ce_s1": mean_ce(hold, 0.0),
            "ce_rerank": mean_ce(hold, beta), "candidates": int(cands.shape[-1])}


def summarise(d: dict, mask: torch.Tensor, eset, K: int, train_words: set | None) -> dict:
    """The diagnostics of one set from collect()'s arrays."""
    m = mask.float()
    mean = lambda v, w: ((v * w).sum() / w.sum().clamp_min(1)).item()  # noqa: E731
    delta = d["ceK"] - d["ce0"]  # (N, T) per position: > 0 where thinking hurt
    res: dict = {"K": K, "delta": mean(delta, m)}
    harm = {}
    if "s1_right" in d:
        for name, w in (("s1_right", d["s1_right"]), ("s1_wrong", 1 - d["s1_right"])):
            harm[name] = {"delta": mean(delta, m * w), "n": int((m * w).sum())}
        ent = d["s1_entropy"][mask]
        edges = torch.quantile(ent, torch.linspace(0, 1, 6)).tolist()
        harm["entropy_quintiles"] = []
        for q in range(5):
            w = m * (d["s1_entropy"] >= edges[q]) * (d["s1_entropy"] <= edges[q + 1])
            harm["entropy_quintiles"].append({"lo": edges[q], "hi": edges[q + 1], "delta": mean(delta, w),
                                              "n": int(w.sum())})
    if train_words is not None and eset.text is not None:
        in_word, novel = word_flags(eset.text, train_words)
        iw, nv = torch.from_numpy(in_word[eset.pos]).float(), torch.from_numpy(novel[eset.pos]).float()
        harm["word_seen"] = {"delta": mean(delta, m * iw * (1 - nv)), "n": int((m * iw * (1 - nv)).sum())}
        harm["word_novel"] = {"delta": mean(delta, m * nv), "n": int((m * nv).sum())}
    res["harm"] = harm
    # temperature: fit on even windows, score on odd ones
    n = len(mask)
    cnt = mask.sum(1).float()  # (N,)
    fit, hold = torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1
    res["temperature"] = temperature_table(d["temp_ce"], cnt, fit, hold)
    res["grad_cos"] = [mean(d["grad_cos"][..., k], m) for k in range(K)]
    res["sharpen_cos"] = [mean(d["sharpen"][..., k], m) for k in range(K)]
    res["sharpen_frac"] = [mean(d["sharpen"][..., k] ** 2, m) for k in range(K)]
    res["spearman_E_ce"] = spearman(d["E_final"][mask], d["ceK"][mask])
    if d["rerank"]:
        res["rerank"] = fit_rerank(d["rerank"], mask, (n + 1) // 2)
    return res


def temperature_table(tc: torch.Tensor, cnt: torch.Tensor, fit, hold) -> dict:
    """Per k: the best temperature on the fit windows and the held-out CE with and without it."""
    one = int(torch.argmin((TEMPS - 1).abs()))
    rows = {"T_k": [], "ce_raw": [], "ce_tuned": []}
    for k in range(tc.shape[1]):
        g = int(torch.argmin(tc[fit, k].sum(0)))
        rows["T_k"].append(TEMPS[g].item())
        rows["ce_raw"].append((tc[hold, k, one].sum() / cnt[hold].sum()).item())
        rows["ce_tuned"].append((tc[hold, k, g].sum() / cnt[hold].sum()).item())
    return rows


def training_words(data, tok) -> set:
    """The words (letter runs) of the training split, for the novel-word harm split."""
    return set(re.findall(r"[^\W\d_]+", tok.decode(np.asarray(data.train))))


def report(diag: dict) -> str:
    """Markdown summary: one block per set."""
    f = lambda v: f"{v:+.4f}"  # noqa: E731
    lines = []
    for name, d in diag.items():
        lines += [f"## {name}", "", f"mean CE change over {d['K']} steps (k=K − k=0): {f(d['delta'])}", ""]
        h = d["harm"]
        for key in ("s1_right", "s1_wrong", "word_seen", "word_novel"):
            if key in h:
                lines.append(f"- {key}: {f(h[key]['delta'])} over {h[key]['n']} positions")
        for q, b in enumerate(h.get("entropy_quintiles", [])):
            lines.append(f"- S1 entropy quintile {q + 1} [{b['lo']:.2f}, {b['hi']:.2f}]: {f(b['delta'])}")
        t = d["temperature"]
        lines += ["", "| k | T_k | CE held-out | CE at T_k |", "|---|---|---|---|"]
        lines += [f"| {k} | {t['T_k'][k]:.3f} | {t['ce_raw'][k]:.4f} | {t['ce_tuned'][k]:.4f} |"
                  for k in range(len(t["T_k"]))]
        lines += ["", "- cos(dE/dz_k, dE/dz_k+1): " + ", ".join(f"{c:.3f}" for c in d["grad_cos"]),
                  "- cos(step, sharpening direction): " + ", ".join(f"{c:+.3f}" for c in d["sharpen_cos"]),
                  "- share of each step along it: " + ", ".join(f"{c:.3f}" for c in d["sharpen_frac"]),
                  f"- Spearman(E(z_K), CE(z_K)): {d['spearman_E_ce']:+.3f}"]
        if "rerank" in d:
            rr = d["rerank"]
            lines.append(f"- rerank over {rr['candidates']} one-hot candidates: beta {rr['beta']:.3g} "
                         f"(beta·std E {rr['beta_x_std_E']:+.2f}); held-out CE S1 {rr['ce_s1']:.4f} → "
                         f"{rr['ce_rerank']:.4f}")
        lines.append("")
    return "\n".join(lines)
