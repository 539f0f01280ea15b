"""Export energy-landscape pictures of a trained EBT, computed from the model's real energies.

    uv run python viz.py --checkpoint=out_ebt/final.pt --mode=gap --steps=8
    uv run python viz.py mode=surface_anim prompt="HAMLET:" writer=gif
    uv run python viz.py --prompt="ROMEO:" --topk=20        # no mode: topk; no checkpoint: latest

Modes (files go to out_dir, default out_ebt/viz; each written file is printed as `wrote PATH`):
  topk          energies of the `topk` lowest-energy next tokens, each as a one-hot candidate
  gap           mean energy and CE per think step over a val batch (the descent curve)
  gap_multi     `multi_trajectories` Langevin-noisy think chains for the prompt, overlaid
  bowl_panels   per think step, E along that step's update direction through z_k (a real slice)
  bowl_anim     the same as an animation (writer=auto|gif|mp4)
  traj          logits (or probs, traj_space=probs) of the `topk_think` most likely tokens
  surface3d     E over the plane of the two most contested tokens' logits, with the think path
  surface_anim  the point moving; each frame is the slice through the current candidate
  margin        E(true token) vs E(final candidate) and vs other one-hot tokens, + text report
  eval          val loss / bpb (bpt for BPE) after k = 0..steps think steps, + JSON/markdown
  per_token     bowl panels (per_token_anim=true: animations) for the next `tokens` tokens
Options: VizConfig below.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import OmegaConf

from nanoebm import landscape as L
from nanoebm import plots as P
from nanoebm.checkpoint import model_from_checkpoint, open_checkpoint
from nanoebm.config import DataConfig, check_rules, choice_rules
from nanoebm.cli import apply_cli_shims, register_configs
from nanoebm.data import load_data
from nanoebm.losses import thinking_curve
from nanoebm.runtime import pick_device, set_threads
from nanoebm.tokenizer import tokenizer_from_meta

FULL_SCAN_VOCAB = 4096  # topk: above this vocabulary, rank the 1024 most probable tokens only


@dataclass
class VizConfig:
    """viz.py: pictures computed from a checkpoint's real energies (see viz.py for the modes)."""
    checkpoint: Optional[str] = None  # None: the newest out_ebt/run_*/final.pt, else bundled
    mode: str = "topk"           # one of VIZ_MODES (viz.py's docstring says what each draws)
    prompt: str = "ROMEO:"
    steps: int = 8               # think steps to trace (K)
    topk: int = 20               # topk: bars for the lowest-energy next tokens
    topk_think: int = 10         # traj: tokens whose trajectories are drawn
    traj_space: str = "logits"   # traj: logits (centred) | probs
    multi_trajectories: int = 5  # gap_multi: noisy chains overlaid
    think_noise: float = 0.3     # gap_multi: std of the noise added to z before each step
    tokens: int = 3              # per_token: generated tokens to trace
    per_token_anim: bool = False  # per_token: one animation per token instead of panels
    grid: int = 41               # points per axis of bowl profiles / surface slices (made odd)
    span: float = 4.0            # half-width of bowl profiles / surface padding, logit units
    split: str = "val"           # batch modes (gap, margin, eval): train | val
    batch_size: int = 16
    eval_iters: int = 4          # eval: fixed batches in the thinking curve
    data_path: Optional[str] = None  # batch modes: None = the checkpoint's data.data_path
    out_dir: str = "out_ebt/viz"
    writer: str = "auto"         # animations: auto (mp4 if ffmpeg exists, else gif) | gif | mp4
    seed: int = 1337
    dpi: int = 100
    device: str = "auto"         # auto (cuda > mps > cpu) | cuda | mps | cpu
    threads: int = 0             # torch CPU threads; 0 = auto (one for a small model)
    think_neutral: bool = True   # sharpening-neutral steps (lab/LOG.md); false: plain steps

    def __post_init__(self):
        min_steps = 0 if self.mode in ("topk", "eval") else 1
        counts = ("topk", "topk_think", "multi_trajectories", "tokens", "batch_size", "eval_iters",
                  "dpi")
        check_rules(choice_rules(self, "", {"mode": VIZ_MODES, "writer": ("auto", "gif", "mp4"),
                                   "split": ("train", "val"), "traj_space": ("logits", "probs")})
               + [(self.steps >= min_steps,
                   f"steps={self.steps}: mode={self.mode} needs steps >= {min_steps}")]
               + [(getattr(self, n) >= 1, f"{n}={getattr(self, n)} must be >= 1") for n in counts]
               + [(self.grid >= 3 and self.span > 0,
                   f"grid={self.grid}, span={self.span}: need grid >= 3 and span > 0")])


VIZ_MODES = ("topk", "gap", "gap_multi", "bowl_panels", "bowl_anim", "traj", "surface3d",
             "surface_anim", "margin", "eval", "per_token")


class Viz:
    """What every mode needs: the config, the model and tokenizer, and the written files."""

    def __init__(self, cfg: VizConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        path, self.ckpt, line = open_checkpoint(cfg.checkpoint, "out_ebt")
        print(line)
        self.ckpt_path = str(path)
        self.model = model_from_checkpoint(self.ckpt, self.device,
                                           think_neutral=cfg.think_neutral).eval()
        set_threads(cfg.threads, self.model.num_params())
        if not self.model.has_energy and not (cfg.mode == "eval" and cfg.steps == 0):
            raise ValueError(f"{path} is a plain transformer (model.think_steps=0): it has no "
                             "energy landscape to draw (mode=eval steps=0 scores it)")
        self.tok = tokenizer_from_meta(self.ckpt["meta"])
        self.tau = self.model.cfg.softmax_temperature
        self.out = Path(cfg.out_dir).expanduser()
        self.files: list[Path] = []
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)  # think noise

    def wrote(self, path: Path) -> Path:
        print(f"wrote {path}")
        self.files.append(path)
        return path

    def save(self, fig, name: str) -> Path:
        return self.wrote(P.save_png(fig, self.out / name))

    def animate(self, frames, stem: str) -> Path:
        return self.wrote(P.save_animation(frames, self.out / stem, self.cfg.writer))

    def label(self, i: int) -> str:
        return P.token_label(self.tok, i)

    def prompt_ids(self) -> list[int]:
        ids = self.tok.encode(self.cfg.prompt)
        if not ids:
            raise ValueError("prompt is empty: pass prompt=TEXT")
        return ids[-self.model.cfg.block_size:]  # the model sees at most block_size tokens

    def context(self, ids: list[int]):
        x = torch.tensor([ids[-self.model.cfg.block_size:]], device=self.device)  # (1, T)
        with torch.no_grad():
            return self.model.context(x)

    def batches(self, n: int):
        """n fixed (seeded) batches from the checkpoint's corpus, split `split`."""
        saved = self.ckpt.get("config", {}).get("data", {})
        names = {f.name for f in dataclasses.fields(DataConfig)}
        dc = DataConfig(**{k: v for k, v in saved.items() if k in names})
        if self.cfg.data_path:
            dc = dataclasses.replace(dc, data_path=self.cfg.data_path)
        data = load_data(dc)
        if data.meta != self.ckpt["meta"]:
            raise ValueError(f"{dc.data_path} does not have the checkpoint's vocabulary: pass "
                             "data_path=THE_TRAINING_DATA")
        T = min(dc.block_size, self.model.cfg.block_size)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return [data.get_batch(self.cfg.split, self.cfg.batch_size, T, gen, self.device)
                for _ in range(n)], data.bits_name


# ------------------------------------------------------------------------------------ modes
def mode_topk(v: Viz) -> dict:
    cfg, V = v.cfg, v.model.cfg.vocab_size
    ctx = v.context(v.prompt_ids())
    traj = L.prompt_trajectory(v.model, ctx, cfg.steps, generator=v.gen)
    p_final = torch.softmax(traj.z[-1, 0] / v.tau, -1)  # (V,) prediction after thinking
    if V <= FULL_SCAN_VOCAB:
        ids, scope = torch.arange(V, device=v.device), f"all {V} tokens"
    else:
        ids, scope = p_final.topk(1024).indices, "among the 1024 most probable"
    E = L.onehot_energies(v.model, ctx, ids, step=cfg.steps)  # (N,)
    order = E.argsort()[:cfg.topk]
    ids, E = ids[order], E[order]
    fig = P.topk_figure([v.label(i) for i in ids.tolist()], E.cpu().numpy(),
                        p_final[ids].cpu().numpy(), cfg.prompt, scope, cfg.dpi)
    v.save(fig, "topk_energies.png")
    return {"ids": ids.cpu(), "energy": E.cpu(), "scope": scope}


def mode_gap(v: Viz) -> dict:
    cfg = v.cfg
    [(x, y)], bits_name = v.batches(1)
    g = L.batch_gap(v.model, x, y, cfg.steps, generator=v.gen)
    title = (f"thinking on a {cfg.split} batch {tuple(x.shape)}: mean over all positions "
             f"({v.ckpt_path})")
    v.save(P.gap_figure(g["energy"].numpy(), g["ce"].numpy(), bits_name, title, cfg.dpi),
           "energy_gap.png")
    return {"energy": g["energy"], "ce": g["ce"], "x": x, "y": y}


def mode_gap_multi(v: Viz) -> dict:
    cfg = v.cfg
    ctx = v.context(v.prompt_ids())
    traj = L.prompt_trajectory(v.model, ctx, cfg.steps, n=cfg.multi_trajectories,
                               noise=cfg.think_noise, generator=v.gen)
    labels = [v.label(i) for i in traj.z[-1].argmax(-1).tolist()]
    fig = P.multi_figure(traj.energy.cpu().numpy(), labels, cfg.prompt, cfg.think_noise, cfg.dpi)
    v.save(fig, "energy_gap_multi.png")
    return {"energy": traj.energy.cpu()}


def bowl_outputs(v: Viz, ctx, stem: str, title: str, anim: bool) -> dict:
    traj = L.prompt_trajectory(v.model, ctx, v.cfg.steps, generator=v.gen)
    prof = L.bowl_profiles(v.model, ctx, traj, v.cfg.span, v.cfg.grid)
    if anim:
        v.animate(P.bowl_frames(prof, title, v.cfg.dpi), stem)
    else:
        v.save(P.bowl_panels_figure(prof, title, v.cfg.dpi), stem + ".png")
    return {"traj": traj, **prof}


def mode_bowl(v: Viz) -> dict:
    ctx = v.context(v.prompt_ids())
    anim = v.cfg.mode == "bowl_anim"
    return bowl_outputs(v, ctx, "bowl_anim" if anim else "bowl_panels",
                        f"next token after {v.cfg.prompt!r}", anim)


def mode_traj(v: Viz) -> dict:
    cfg = v.cfg
    traj = L.prompt_trajectory(v.model, v.context(v.prompt_ids()), cfg.steps, generator=v.gen)
    ids = L.contested_tokens(traj, v.tau, cfg.topk_think)
    z = traj.z[:, 0]  # (K+1, V)
    if cfg.traj_space == "probs":
        vals = torch.softmax(z / v.tau, -1)[:, ids]
    else:  # softmax ignores a shift, so centre the logits to make steps comparable
        vals = (z - z.mean(-1, keepdim=True))[:, ids]
    fig = P.traj_figure(vals.cpu().numpy(), [v.label(i) for i in ids.tolist()], cfg.traj_space,
                        cfg.prompt, cfg.dpi)
    v.save(fig, "traj.png")
    return {"ids": ids.cpu(), "values": vals.cpu(), "traj": traj}


def mode_surface(v: Viz) -> dict:
    cfg = v.cfg
    ctx = v.context(v.prompt_ids())
    traj = L.prompt_trajectory(v.model, ctx, cfg.steps, generator=v.gen)
    anim = cfg.mode == "surface_anim"
    surf = L.surface(v.model, ctx, traj, cfg.span, cfg.grid, through="each" if anim else "start")
    labels = [v.label(i) for i in surf["tokens"]]
    if not anim:
        title = (f"E over two token logits after {cfg.prompt!r}; other logits held at z_0 "
                 f"(path: red = on this slice, stars = real E(z_k), k=0..{cfg.steps})")
        v.save(P.surface_figure(surf, labels, title, cfg.dpi), "surface3d.png")
    else:
        title = f"E on the slice through z_k after {cfg.prompt!r}"
        v.animate(P.surface_frames(surf, labels, title, cfg.dpi), "surface_anim")
    return {"traj": traj, **surf}


def mode_margin(v: Viz) -> dict:
    cfg = v.cfg
    [(x, y)], _ = v.batches(1)
    m = L.margins(v.model, x, y, cfg.steps, generator=v.gen, seed=cfg.seed)
    v.save(P.margin_figure(m, cfg.steps, cfg.dpi), "margin.png")
    d, o = m["true_minus_final"], m["true_minus_best_other"]
    n, V = m["n_compared"], v.model.cfg.vocab_size
    scored = f"all {n} tokens" if n == V else f"the true token and {n} random others"
    report = (f"checkpoint {v.ckpt_path} | {cfg.split} batch {tuple(x.shape)} | "
              f"think steps {cfg.steps}\n"
              f"positions: {d.numel()}\n"
              f"mean E(true) - E(z_K): {d.mean():+.5f} (median {d.median():+.5f})\n"
              f"fraction E(true) < E(z_K): {m['frac_true_below_final']:.4f}\n"
              f"one-hot candidates scored per position: {scored}\n"
              f"fraction where the true token has the lowest one-hot energy: "
              f"{m['frac_true_lowest']:.4f}\n"
              f"mean rank of the true token (0 = lowest): {m['rank'].float().mean():.2f}\n"
              f"mean E(true) - min E(other one-hot): {o.mean():+.5f}\n")
    path = v.out / "margin.txt"
    path.write_text(report)
    v.wrote(path)
    print(report, end="")
    return m


def mode_eval(v: Viz) -> dict:
    cfg = v.cfg
    batches, bits_name = v.batches(cfg.eval_iters)
    curve = thinking_curve(v.model, batches, cfg.steps, seed=cfg.seed)
    loss_k, s1 = curve["loss_k"], curve.get("loss_s1")
    trained_k = v.model.cfg.eval_think_steps
    v.save(P.eval_figure(loss_k, s1, bits_name, trained_k, cfg.dpi), "eval.png")
    res = {"checkpoint": v.ckpt_path, "split": cfg.split, "batches": cfg.eval_iters,
           "batch_size": cfg.batch_size, "block_size": batches[0][0].shape[1],
           "k": list(range(cfg.steps + 1)), "loss": loss_k,
           bits_name: [l / math.log(2) for l in loss_k], "energy": curve["energy_k"],
           "loss_s1": s1}
    v.wrote(_write(v.out / "eval.json", json.dumps(res, indent=1)))
    rows = [f"| k | val loss | val {bits_name} | mean E |", "|---|---|---|---|"]
    for k, l in enumerate(loss_k):
        e = f"{curve['energy_k'][k]:.4f}" if curve["energy_k"] else "-"
        rows.append(f"| {k} | {l:.4f} | {l / math.log(2):.4f} | {e} |")
    if s1 is not None:
        rows.append(f"\nSystem 1 (no thinking): val loss {s1:.4f}, val {bits_name} "
                    f"{s1 / math.log(2):.4f}")
    table = "\n".join(rows) + "\n"
    v.wrote(_write(v.out / "eval.md", table))
    print(table, end="")
    return res


def mode_per_token(v: Viz) -> dict:
    cfg = v.cfg
    ids, chosen = v.prompt_ids(), []
    for t in range(cfg.tokens):
        ctx = v.context(ids)
        traj = L.prompt_trajectory(v.model, ctx, cfg.steps, generator=v.gen)
        nxt = int(traj.z[-1, 0].argmax())  # greedy: the argmax of the last step's candidate
        tail = v.tok.decode(ids[-24:]).replace("\n", "\\n").replace("$", r"\$")
        title = f"token {t + 1}: ...{tail!r} → {v.label(nxt)!r}"
        bowl_outputs(v, ctx, f"per_token/token_{t + 1:02d}", title, cfg.per_token_anim)
        ids = ids + [nxt]
        chosen.append(nxt)
    print(f"generated: {v.tok.decode(chosen)!r}")
    return {"tokens": chosen}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


DISPATCH = {"topk": mode_topk, "gap": mode_gap, "gap_multi": mode_gap_multi,
            "bowl_panels": mode_bowl, "bowl_anim": mode_bowl, "traj": mode_traj,
            "surface3d": mode_surface, "surface_anim": mode_surface, "margin": mode_margin,
            "eval": mode_eval, "per_token": mode_per_token}


def run(cfg: VizConfig) -> dict:
    """Run one mode; returns its plotted numbers plus "files" (every path written)."""
    v = Viz(cfg)
    res = DISPATCH[cfg.mode](v)
    return {**res, "files": v.files}


def run_cli(cfg) -> dict:
    """run() with bad input (an option, a checkpoint, a prompt) as one `error:` line; cfg is a
    VizConfig or Hydra's config, whose options are checked as it becomes one."""
    try:
        return run(cfg if isinstance(cfg, VizConfig) else OmegaConf.to_object(cfg))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


@hydra.main(version_base="1.3", config_path="configs", config_name="viz")
def main(cfg) -> None:
    run_cli(cfg)


if __name__ == "__main__":
    apply_cli_shims(schema=VizConfig)
    register_configs({"base_viz": VizConfig})
    main()
