"""Is thinking more than calibration? The controls scored beside the thinking curve.

On the same windows as the curve, per set:

    s1_temperature      System 1 at the temperature that minimises its CE (an oracle: it sees
                        the set's labels). Two-fold: T fitted on the even windows scores the odd
                        ones and vice versa; the CE is the mean over both halves.
    s1_entropy_matched  System 1 at the temperature whose mean entropy equals the K-step chain's
                        (no labels at all): is the chain's gain just its change of entropy?
    think_temperature   the chain's z_K at its own fitted temperature (two-fold, as above)
    tt_*                dynamic evaluation (Krause et al. 2018), score first: each batch of the
                        set's windows is scored with the current weights, then tt_steps SGD steps
                        of the next-token CE on it; the weights reset per set. For the plain
                        transformer (tt_baseline), the EBT's System 1 (tt_s1) and the EBT
                        thinking on top of the adapted weights (tt_think).

A temperature is found on a grid (TEMPS, 1.4% apart): per window, the sums of CE and entropy
at every grid temperature are all that the fits need, so nothing of size V is kept. Every
"gain beyond X" is CE(X) - CE(chain) with a paired bootstrap interval over windows.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch

from lab.scoring import paired_bootstrap, window_batches
from nanoebm.losses import ce
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think

TEMPS = torch.logspace(math.log10(0.2), math.log10(5.0), 235)  # the temperature grid


def temp_sums(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, chunk: int = 2**24):
    """Per window, the sums over scored positions m (b, T) of CE and of entropy of z / t for
    every grid temperature t: two (b, G) tensors. Temperatures go in groups of at most `chunk`
    elements, one tensor op each."""
    z, cs, hs = z.float(), [], []
    per = max(1, chunk // z.numel())
    for ts in TEMPS.to(z.device).split(per):
        logp = torch.log_softmax(z[None] / ts[:, None, None, None], -1)  # (g, b, T, V)
        cs.append(-(logp.gather(-1, y[None, ..., None].expand(len(ts), *y.shape, 1))[..., 0] * m).sum(-1))
        hs.append(-((logp.exp() * logp).sum(-1) * m).sum(-1))  # (g, b)
    return torch.cat(cs).T, torch.cat(hs).T


def chain(model: EBT, ctx, x: torch.Tensor, K: int, gen, neutral: bool | None = None):
    """z_K of the K-step chain as the thinking curve runs it (no noise, the batch's generator),
    with sharpening-neutral steps or not (None: the model's own setting)."""
    cfg = model.cfg
    if neutral is not None:
        model.cfg = dataclasses.replace(cfg, think_neutral=neutral)
    try:
        z0 = initial_logits(model, ctx, x.shape[1], generator=gen)
        return think(model, ctx, z0, K, noise=0.0, generator=gen).final
    finally:
        model.cfg = cfg


@torch.no_grad()
def collect(model: EBT, es, K: int, *, batch_size: int, seed: int, device) -> dict:
    """One set's per-window sums (N, G) on the CPU: CE and entropy of System 1 and of the
    K-step chains, plain and sharpening-neutral, at every grid temperature; the counts (N,)."""
    keep: dict[str, list] = {}
    for i in range(0, len(es.x), batch_size):
        x, y = es.x[i:i + batch_size].to(device), es.y[i:i + batch_size].to(device)
        m = es.mask[i:i + batch_size].to(device).float()  # (b, T) scored positions
        gen = torch.Generator(device=x.device).manual_seed(seed + i // batch_size)
        ctx = model.context(x)
        zs = {"s1": ctx.s1_logits, "plain": chain(model, ctx, x, K, gen, False),
              "neutral": chain(model, ctx, x, K, gen, True)}
        for name, z in zs.items():
            c, h = temp_sums(z, y, m)
            keep.setdefault(f"{name}_ce", []).append(c.cpu())
            keep.setdefault(f"{name}_h", []).append(h.cpu())
        keep.setdefault("n", []).append(m.sum(1).cpu())
    return {k: torch.cat(v) for k, v in keep.items()}


def two_fold(ce_sums: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Per-window CE sums (N,) at the temperature fitted on the other half of the windows (even
    windows fit the odd ones and vice versa), and the two fitted temperatures."""
    even = torch.arange(len(n)) % 2 == 0
    out, temps = torch.zeros(len(n), dtype=ce_sums.dtype), []
    for fit in (even, ~even):
        g = int(torch.argmin(ce_sums[fit].sum(0)))  # the CE minimiser on this half
        out[~fit] = ce_sums[~fit, g]
        temps.append(TEMPS[g].item())
    return out, temps


def at_entropy(ce_sums: torch.Tensor, h_sums: torch.Tensor, n: torch.Tensor, target: float):
    """Per-window CE sums (N,) at the temperature where the mean entropy equals target (linear in
    log T between grid points: the mean entropy rises with T), and that temperature."""
    h = h_sums.sum(0) / n.sum()  # (G,) mean entropy at each grid temperature
    j = int(torch.searchsorted(h.contiguous(), torch.tensor(target, dtype=h.dtype)).clamp(1, len(h) - 1))
    w = ((target - h[j - 1]) / (h[j] - h[j - 1])).clamp(0, 1).item()  # between grid points j-1, j
    logt = (1 - w) * TEMPS[j - 1].log() + w * TEMPS[j].log()
    return (1 - w) * ce_sums[:, j - 1] + w * ce_sums[:, j], logt.exp().item()


def calibration(d: dict, n_boot: int, seed: int) -> tuple[dict, dict]:
    """The calibration controls of one set from collect()'s sums: CEs (nats/token), fitted
    temperatures, every thinking gain beyond a control with its interval; and the per-window CE
    sums (N,) of each variant."""
    n, one = d["n"], int(torch.argmin((TEMPS - 1).abs()))
    mean = lambda s: (s.sum() / n.sum()).item()  # noqa: E731
    per = {"s1": d["s1_ce"][:, one]}  # per-window CE sums of every scored variant
    per["s1_temperature"], t_s1 = two_fold(d["s1_ce"], n)
    out = {"T_s1": t_s1, "T_think": {}, "T_entropy": {}, "entropy": {}}
    for c in ("plain", "neutral"):
        per[c] = d[f"{c}_ce"][:, one]
        per[f"think_temperature_{c}"], out["T_think"][c] = two_fold(d[f"{c}_ce"], n)
        out["entropy"][c] = mean(d[f"{c}_h"][:, one])  # the chain's mean entropy: the target
        per[f"s1_entropy_matched_{c}"], out["T_entropy"][c] = at_entropy(
            d["s1_ce"], d["s1_h"], n, out["entropy"][c])
    out.update({k: mean(v) for k, v in per.items()})
    w = n[:, None].double()
    gain = lambda a, b: list(paired_bootstrap((per[a] - per[b]).double()[:, None] / w.clamp_min(1), w,
                                              n_boot, seed))  # noqa: E731
    out["gain_neutral_over_plain"] = gain("plain", "neutral")  # decides the inference default
    for c in ("plain", "neutral"):
        out[f"gain_beyond_s1_{c}"] = gain("s1", c)
        out[f"gain_beyond_s1_temperature_{c}"] = gain("s1_temperature", c)
        out[f"gain_beyond_s1_entropy_matched_{c}"] = gain(f"s1_entropy_matched_{c}", c)
        out[f"gain_beyond_temperature_{c}"] = gain("s1_temperature", f"think_temperature_{c}")
    # the unsuffixed names: against the neutral chain, the inference default
    out["s1_entropy_matched"], out["think_temperature"] = (out["s1_entropy_matched_neutral"],
                                                           out["think_temperature_neutral"])
    return out, {k: v.double() for k, v in per.items()}


# -------------------------------------------------------------------- dynamic evaluation
def dynamic_eval(model: EBT, es, K: int, *, steps: int, lr: float, batch_size: int, seed: int,
                 device) -> dict:
    """Score first, then adapt: per-window CE sums (N,) of System 1 ("s1") and, for a model that
    thinks, of the K-step chain on top ("think"), each batch scored with the weights adapted on
    the batches before it by `steps` SGD steps of the S1 CE. A copy of the model adapts: the
    weights reset for every set."""
    m_ = copy.deepcopy(model).eval()
    opt = torch.optim.SGD([p for p in m_.parameters() if p.requires_grad], lr=lr)
    sums: dict[str, list] = {}
    for i in range(0, len(es.x), batch_size):
        x, y = es.x[i:i + batch_size].to(device), es.y[i:i + batch_size].to(device)
        msk = es.mask[i:i + batch_size].to(device).float()
        gen = torch.Generator(device=x.device).manual_seed(seed + i // batch_size)
        with torch.no_grad():  # score with the weights as they are before this batch
            ctx = m_.context(x)
            sums.setdefault("s1", []).append((ce(ctx.s1_logits, y, "none").view(y.shape) * msk).sum(1).cpu())
            if K > 0:
                z = chain(m_, ctx, x, K, gen)
                sums.setdefault("think", []).append((ce(z, y, "none").view(y.shape) * msk).sum(1).cpu())
        for _ in range(steps):  # then learn from it
            loss = (ce(m_.context(x).s1_logits, y, "none").view(y.shape) * msk).sum() / msk.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: torch.cat(v) for k, v in sums.items()}


def flops_per_token(K: int, tt_steps: int) -> dict:
    """Each method's cost in forward passes of the model per scored token: a think step is a
    candidate-stream forward and its backward (~3 forwards), an SGD step a forward and a
    backward of the context stream (~3), a temperature nothing measurable."""
    return {"s1": 1, "temperature": 1, "think": 1 + 3 * K, "tt": 1 + 3 * tt_steps,
            "tt_think": 1 + 3 * tt_steps + 3 * K}


TT_GRID = {"lr": [1e-2, 3e-2, 1e-1, 3e-1, 1.0], "steps": [1, 2]}
TT_WINDOWS = 128  # the first val windows that choose the setting


def choose_tt(model: EBT, val, K: int, *, batch_size: int, seed: int, device) -> dict:
    """tt_lr and tt_steps picked on val alone (its first TT_WINDOWS windows): the lowest S1 CE
    among the grid settings that cost at most the K think steps' forward passes per token."""
    budget = flops_per_token(K, 0)["think"]
    val = dataclasses.replace(val, x=val.x[:TT_WINDOWS], y=val.y[:TT_WINDOWS], mask=val.mask[:TT_WINDOWS])
    best = None
    for steps in TT_GRID["steps"]:
        if flops_per_token(K, steps)["tt"] > budget:
            continue
        for lr in TT_GRID["lr"]:
            r = dynamic_eval(model, val, 0, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                             device=device)
            c = (r["s1"].sum() / val.mask.sum()).item()
            if best is None or c < best["val_ce"]:
                best = {"lr": lr, "steps": steps, "val_ce": c}
    return best


# -------------------------------------------------------------------------- on every set
def score_controls(model: EBT, bmodel, sets: list, rows: dict, K: int, cfg, device) -> dict:
    """Every control on every set, into rows[set]["controls"]; returns the dynamic-evaluation
    settings (chosen on val unless cfg.tt_lr / cfg.tt_steps fix them) and each method's FLOPs."""
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    val = next((es for es in sets if es.name == "val"), None)
    tt = {}
    for who, m in (("ebt", model), ("baseline", bmodel)):
        if m is None:
            continue
        if cfg.tt_lr is not None and cfg.tt_steps is not None:
            tt[who] = {"lr": cfg.tt_lr, "steps": cfg.tt_steps}
        elif val is not None:
            tt[who] = choose_tt(m, val, K, **kw)
    for es in sets:
        c, per = calibration(collect(model, es, K, **kw), cfg.bootstrap, cfg.seed)
        n = es.mask.sum(1).double()  # (N,) scored positions per window
        rows[es.name]["controls"] = c
        if not tt:  # no val set to choose its settings on, and none given: no dynamic evaluation
            continue
        c["tt"] = tt  # the settings it ran with (chosen on val, or given)
        d = dynamic_eval(model, es, K, steps=tt["ebt"]["steps"], lr=tt["ebt"]["lr"], **kw)
        c["tt_s1"], c["tt_think"] = (d["s1"].sum() / n.sum()).item(), (d["think"].sum() / n.sum()).item()
        for chain_ in ("plain", "neutral"):  # the static chain's gain beyond adapted weights
            c[f"gain_beyond_tt_s1_{chain_}"] = list(paired_bootstrap(
                ((d["s1"] - per[chain_]) / n.clamp_min(1))[:, None], n[:, None], cfg.bootstrap, cfg.seed))
        if bmodel is not None:
            b = dynamic_eval(bmodel, es, 0, steps=tt["baseline"]["steps"], lr=tt["baseline"]["lr"], **kw)
            c["tt_baseline"] = (b["s1"].sum() / n.sum()).item()
        print(f"controls {es.name}: S1 {c['s1']:.4f} | at T {c['s1_temperature']:.4f} | entropy-"
              f"matched {c['s1_entropy_matched_plain']:.4f} | think {c['plain']:.4f} / neutral "
              f"{c['neutral']:.4f} | tt_s1 {c['tt_s1']:.4f}", flush=True)
    return {"tt": tt, "flops_per_token": flops_per_token(K, tt["ebt"]["steps"] if tt else 0)}


# ------------------------------------------------------------------------------ report
METHODS = [  # (label, how its gain over System 1 is read from a set's controls, line style)
    ("plain steps", lambda c: c["s1"] - c["plain"], "-"),
    ("neutral steps", lambda c: c["s1"] - c["neutral"], "-"),
    ("S1 entropy-matched to the neutral chain", lambda c: c["s1"] - c["s1_entropy_matched_neutral"], "-"),
    ("S1 at its fitted T (oracle)", lambda c: c["s1"] - c["s1_temperature"], "--"),
    ("dynamic evaluation of S1", lambda c: c["s1"] - c["tt_s1"], "-"),
    ("dynamic evaluation + thinking", lambda c: c["s1"] - c["tt_think"], "-"),
]


def table(res: dict) -> str:
    """Markdown: per set, CE (nats) of System 1, the chains and every control, and the gains of
    the neutral chain beyond them with 95% intervals."""
    head = ["set", "ln r", "S1", "plain", "neutral", "S1 at T", "S1 entropy-matched (neutral)",
            "z_K at T (neutral)", "tt baseline", "tt S1", "tt + thinking",
            "neutral beyond T", "neutral beyond entropy-matched", "neutral beyond tt S1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ci = lambda g: "–" if g is None else f"{g[0]:+.4f} [{g[1]:+.4f}, {g[2]:+.4f}]"  # noqa: E731
    for name, s in res["sets"].items():
        c = s["controls"]
        lines.append("| " + " | ".join([
            name, f"{s.get('ln_r', float('nan')):+.3f}"] + [f"{c[k]:.4f}" if k in c else "–" for k in (
                "s1", "plain", "neutral", "s1_temperature", "s1_entropy_matched_neutral",
                "think_temperature_neutral", "tt_baseline", "tt_s1", "tt_think")] + [
            ci(c["gain_beyond_s1_temperature_neutral"]), ci(c["gain_beyond_s1_entropy_matched_neutral"]),
            ci(c.get("gain_beyond_tt_s1_neutral"))]) + " |")
    tt, fl = res["controls"]["tt"], res["controls"]["flops_per_token"]
    edge = lambda t: " (the grid's edge)" if t["lr"] in (TT_GRID["lr"][0], TT_GRID["lr"][-1]) else ""  # noqa: E731
    lines += ["", ("Dynamic evaluation (chosen on val): " + ", ".join(
        f"{who} lr {t['lr']:g}{edge(t)} x {t['steps']} steps" for who, t in tt.items()) if tt else
        "No dynamic evaluation: no val set to choose tt_lr and tt_steps on (or give both)")
        + ". Forward passes per token: " + ", ".join(f"{k} {v}" for k, v in fl.items()) + "."]
    return "\n".join(lines)


def plot(results: list, path) -> None:
    """Fig. 7 with every method: gain over System 1 against ln r, one line per method and
    checkpoint (results: [(label, eval result), ...])."""
    from lab.scorecard import graded, save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, res) in enumerate(results):
        named = {n: s for n, s in res["sets"].items() if "controls" in s and "ln_r" in s}
        line = sorted((named[n] for n in graded(named)), key=lambda s: s["ln_r"])  # val, corrupt_*
        rest = [s for n, s in named.items() if n not in graded(named)]  # other kinds of shift
        for j, (name, gain, style) in enumerate(METHODS):
            if "dynamic" in name and any("tt_s1" not in s["controls"] for s in named.values()):
                continue  # no dynamic evaluation without a val set
            kw = dict(color=f"C{j}", alpha=0.9 if i == 0 else 0.5)
            ax.plot([s["ln_r"] for s in line], [gain(s["controls"]) for s in line], style, marker="o",
                    ms=3, label=name if i == 0 else None, **kw)
            ax.plot([s["ln_r"] for s in rest], [gain(s["controls"]) for s in rest], "x", ms=6, **kw)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("ln r (shift: the baseline's CE on the set minus on val)")
    ax.set_ylabel("gain over System 1 (nats/char)")
    n = f" ({len(results)} checkpoints)" if len(results) > 1 else ""
    ax.set_title(f"thinking and its controls under shift{n}: lines val + corrupt_*, x other sets",
                 fontsize=9)
    save_figure(fig, [ax], path)
