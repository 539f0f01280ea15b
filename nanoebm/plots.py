"""Figures and animations for viz.py. Drawing only: the numbers come from nanoebm/landscape.py.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so nothing depends on a
display or on global backend state. Animations are lists of rendered RGB frames written as a GIF
(Pillow) or an MP4 (ffmpeg, when it is installed).
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

FPS = 2  # animation frames per second: one think step every half second


def token_label(tok, i: int, width: int = 12) -> str:
    """A printable label for token i: whitespace made visible, '$' kept out of mathtext."""
    s = tok.decode([int(i)])
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣")
    s = s.replace("$", r"\$")
    return s[:width] if s else "∅"


def new_fig(w: float, h: float, dpi: int) -> Figure:
    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def render(fig: Figure, freeze_layout: bool = False) -> np.ndarray:
    """The figure as an RGB array (H, W, 3) for an animation frame. freeze_layout keeps the
    positions just computed for later frames (steadier and much cheaper to draw)."""
    fig.canvas.draw()
    if freeze_layout:
        fig.set_layout_engine("none")
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_animation(frames: list[np.ndarray], stem: Path, writer: str) -> Path:
    """Write frames to stem.mp4 (writer=mp4, or auto when ffmpeg is on PATH) or stem.gif.
    A missing or failing ffmpeg falls back to a GIF with a one-line note, never a crash."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")
    if writer == "mp4" or (writer == "auto" and ffmpeg):
        path = stem.with_suffix(".mp4")
        if ffmpeg and _write_mp4(frames, path, ffmpeg):
            return path
        why = "ffmpeg failed" if ffmpeg else "ffmpeg not found"
        print(f"note: {why}, writing a GIF instead (install ffmpeg for MP4, or writer=gif)")
    path = stem.with_suffix(".gif")
    # an adaptive palette per frame; the step counter in each title keeps frames distinct, so
    # Pillow does not merge them and the GIF has exactly one frame per think step
    imgs = [Image.fromarray(f).quantize(colors=128) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=1000 // FPS, loop=0)
    return path


def _write_mp4(frames: list[np.ndarray], path: Path, ffmpeg: str) -> bool:
    h, w, _ = frames[0].shape
    cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-",
           "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", str(path)]
    try:  # yuv420p needs even sizes, hence the pad filter
        r = subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), capture_output=True)
    except OSError:
        return False
    return r.returncode == 0 and path.exists() and path.stat().st_size > 0


# ----------------------------------------------------------------------------- single figures
def topk_figure(labels, energies, probs, prompt: str, scope: str, dpi: int) -> Figure:
    fig = new_fig(max(6, 0.4 * len(labels) + 2), 4.6, dpi)
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    x = np.arange(len(labels))
    ax.bar(x, energies, color="tab:blue")
    ax.set_ylabel("energy E (one-hot)")
    ax.set_title(f"lowest-energy next tokens after {prompt!r} ({scope})", fontsize=9)
    ax2.bar(x, probs, color="tab:orange")  # what thinking predicts, for comparison
    ax2.set_ylabel("p after\nthinking", fontsize=8)
    ax2.set_xticks(x, labels, rotation=60 if max(map(len, labels)) > 2 else 0)
    return fig


def gap_figure(energy, ce, bits_name: str, title: str, dpi: int) -> Figure:
    fig = new_fig(6, 4, dpi)
    ax = fig.add_subplot()
    k = np.arange(len(energy))
    ax.plot(k, energy, "o-", color="tab:blue", label="mean energy E(z_k)")
    ax.set_xlabel("think step k")
    ax.set_ylabel("mean energy", color="tab:blue")
    gap = energy[-1] - energy[0]
    ax.annotate(f"E_K - E_0 = {gap:+.4f}", xy=(k[-1], energy[-1]), xytext=(0.45, 0.85),
                textcoords="axes fraction", arrowprops={"arrowstyle": "->"}, fontsize=9)
    ax2 = ax.twinx()
    ax2.plot(k, ce, "s--", color="tab:red", label="CE(z_k)")
    ax2.set_ylabel(f"cross-entropy (nats; /ln2 = {bits_name})", color="tab:red")
    ax.set_title(title, fontsize=9)
    return fig


def multi_figure(energy, labels, prompt: str, noise: float, dpi: int) -> Figure:
    """energy (K+1, n): one line per noisy chain, labelled with the chain's final argmax."""
    fig = new_fig(6, 4, dpi)
    ax = fig.add_subplot()
    k = np.arange(energy.shape[0])
    for c in range(energy.shape[1]):
        ax.plot(k, energy[:, c], "-", alpha=0.6, lw=1, label=f"chain {c}: → {labels[c]}")
    ax.plot(k, energy.mean(1), "k-", lw=2.5, label="mean")
    ax.set_xlabel("think step k")
    ax.set_ylabel("energy E(z_k), next token")
    ax.set_title(f"{energy.shape[1]} think chains after {prompt!r}, think_noise={noise}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _bowl_axis(ax, prof: dict, k: int, ylim):
    s, e = prof["s"].numpy(), prof["energy"][k].numpy()
    ax.plot(s, e, "-", color="tab:blue", lw=1.5)
    ax.plot([0], [prof["point_energy"][k]], "o", color="tab:red", ms=7, label="z_k")
    K = prof["energy"].shape[0] - 1
    if k < K:  # where this step's update lands, on the same line
        d = prof["step_len"][k].item()
        ax.plot([d], [np.interp(d, s, e)], "o", mfc="none", mec="tab:red", ms=7, label="z_k+1")
    ax.set_ylim(*ylim)
    ax.set_title(f"k={k}  E={prof['point_energy'][k]:.4f}", fontsize=8)
    ax.tick_params(labelsize=7)


def _ylim(arr: np.ndarray):
    lo, hi = float(arr.min()), float(arr.max())
    pad = 0.05 * (hi - lo) + 1e-6
    return lo - pad, hi + pad


def bowl_panels_figure(prof: dict, title: str, dpi: int) -> Figure:
    n = prof["energy"].shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # a shared y axis compares the steps at a glance; fixed margins (no layout engine) keep
    # this many-axes figure cheap to draw
    fig = Figure(figsize=(2.6 * cols, 2.1 * rows + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axs = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06, top=0.86, hspace=0.35, wspace=0.08)
    ylim = _ylim(prof["energy"].numpy())
    for k, ax in enumerate(axs):
        if k < n:
            _bowl_axis(ax, prof, k, ylim)
        else:
            ax.set_visible(False)
    axs[0].legend(fontsize=6)
    fig.suptitle(title + "\nE along each step's update direction (s: logits; 0 = current z_k)",
                 fontsize=9)
    return fig


def bowl_frames(prof: dict, title: str, dpi: int) -> list[np.ndarray]:
    """One frame per think step: the profile through z_k (left) and E(z_0..z_k) (right).
    One figure is drawn and its artists updated, like matplotlib's FuncAnimation."""
    s, E, pe = prof["s"].numpy(), prof["energy"].numpy(), prof["point_energy"].numpy()
    K = E.shape[0] - 1
    fig = new_fig(8, 3.4, dpi)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    line, = ax.plot(s, E[0], "-", color="tab:blue", lw=1.5)
    cur, = ax.plot([0], [pe[0]], "o", color="tab:red", ms=7, label="z_k")
    nxt, = ax.plot([], [], "o", mfc="none", mec="tab:red", ms=7, label="z_k+1")
    ax.set_ylim(*_ylim(E))
    ax.set_xlabel("s (logits) along the step's update direction")
    ax.set_ylabel("energy")
    ax.legend(fontsize=7, loc="upper right")
    trail, = ax2.plot([], [], "o-", color="tab:red")
    ax2.set_xlim(-0.3, K + 0.3)
    ax2.set_ylim(*_ylim(pe))
    ax2.set_xlabel("think step k")
    ax2.set_ylabel("E(z_k)")
    frames = []
    for k in range(K + 1):
        line.set_ydata(E[k])
        cur.set_ydata([pe[k]])
        d = prof["step_len"][k].item()
        nxt.set_data(([d], [np.interp(d, s, E[k])]) if k < K else ([], []))
        trail.set_data(np.arange(k + 1), pe[:k + 1])
        ax.set_title(f"k={k}  E={pe[k]:.4f}", fontsize=8)
        fig.suptitle(f"{title} | think step {k}/{K}", fontsize=9)
        frames.append(render(fig, freeze_layout=True))
    return frames


def traj_figure(values, labels, space: str, prompt: str, dpi: int) -> Figure:
    """values (K+1, n): one line per token, most probable first; the first 10 get a legend."""
    fig = new_fig(7, 4.2, dpi)
    ax = fig.add_subplot()
    k = np.arange(values.shape[0])
    for c in range(values.shape[1]):
        kw = {"label": labels[c], "lw": 1.8} if c < 10 else {"color": "0.75", "lw": 0.8}
        ax.plot(k, values[:, c], "-", **kw)
    ax.set_xlabel("think step k")
    ax.set_ylabel("probability" if space == "probs" else "centred logit z_k - mean(z_k)")
    ax.set_title(f"trajectories of the {values.shape[1]} most likely next tokens after "
                 f"{prompt!r}", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return fig


def _surface_axes(fig: Figure):
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax3.set_box_aspect(None, zoom=0.85)  # leave room for the axis labels
    return ax3, fig.add_subplot(1, 2, 2)


def _draw_surface(ax3, ax, surf: dict, idx: int, upto: int, labels, norm):
    """Slice `idx` as a 3-D surface (ax3) and a contour map (ax), the path up to step `upto`."""
    a, b, E = surf["a"].numpy(), surf["b"].numpy(), surf["energy"][idx].numpy()
    pa, pb = surf["path_a"].numpy()[:upto + 1], surf["path_b"].numpy()[:upto + 1]
    pe = surf["path_energy"].numpy()[:upto + 1]
    A, B = np.meshgrid(a, b)
    ax3.plot_surface(A, B, E, cmap="viridis", norm=norm, alpha=0.8, linewidth=0)
    if surf["energy"].shape[0] == 1:  # one slice through z_0: the path projected onto it
        ax3.plot(pa, pb, surf["path_on_slice"].numpy()[:upto + 1], "r-", lw=2,
                 label="path on the slice")
    ax3.plot(pa, pb, pe, "k*--", ms=6, lw=1, label="real E(z_k)")
    ax3.plot(pa[-1:], pb[-1:], pe[-1:], "o", color="tab:red", ms=8)
    ax3.set_zlim(norm.vmin, norm.vmax)
    ax3.set_xlabel(f"τ·log p({labels[0]})", fontsize=8)
    ax3.set_ylabel(f"τ·log p({labels[1]})", fontsize=8)
    ax3.set_zlabel("energy", fontsize=8)
    ax3.tick_params(labelsize=6)
    ax3.legend(fontsize=7, loc="upper left")
    ax.contourf(A, B, E, levels=20, cmap="viridis", norm=norm)
    ax.plot(pa, pb, "r.-", lw=1.5)
    ax.plot(pa[:1], pb[:1], "wo", ms=6, mec="k", label="z_0")
    ax.plot(pa[-1:], pb[-1:], "o", color="tab:red", mec="k", ms=8, label=f"z_{upto}")
    ax.set_xlabel(f"τ·log p({labels[0]})")
    ax.set_ylabel(f"τ·log p({labels[1]})")
    ax.legend(fontsize=7)


def _surface_norm(surf: dict):
    lo, hi = _ylim(np.concatenate([surf["energy"].numpy().ravel(), surf["path_energy"].numpy()]))
    return Normalize(lo, hi)  # one colour scale for every slice and frame


def surface_figure(surf: dict, labels, title: str, dpi: int) -> Figure:
    fig = new_fig(10, 4.4, dpi)
    ax3, ax = _surface_axes(fig)
    norm = _surface_norm(surf)
    _draw_surface(ax3, ax, surf, 0, len(surf["path_a"]) - 1, labels, norm)
    fig.colorbar(ScalarMappable(norm, "viridis"), ax=ax, label="energy")
    fig.suptitle(title, fontsize=9)
    return fig


def surface_frames(surf: dict, labels, title: str, dpi: int) -> list[np.ndarray]:
    """Frame k: the slice through z_k, so the current point lies on the drawn surface."""
    fig = new_fig(10, 4.4, dpi)
    ax3, ax = _surface_axes(fig)
    norm = _surface_norm(surf)
    fig.colorbar(ScalarMappable(norm, "viridis"), ax=ax, label="energy")
    K = surf["energy"].shape[0] - 1
    frames = []
    for k in range(K + 1):
        ax3.cla()
        ax.cla()
        _draw_surface(ax3, ax, surf, k, k, labels, norm)
        fig.suptitle(f"{title} | think step {k}/{K}", fontsize=9)
        frames.append(render(fig, freeze_layout=True))
    return frames


def margin_figure(m: dict, steps: int, dpi: int) -> Figure:
    fig = new_fig(10, 3.8, dpi)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.hist(m["true_minus_final"].numpy(), bins=40, color="tab:blue")
    ax1.axvline(0, color="k", lw=1)
    ax1.set_xlabel(f"E(true one-hot) - E(z_{steps})")
    ax1.set_title(f"true token vs final candidate: {100 * m['frac_true_below_final']:.1f}% "
                  "below", fontsize=9)
    ax2.hist(m["true_minus_best_other"].numpy(), bins=40, color="tab:green")
    ax2.axvline(0, color="k", lw=1)
    ax2.set_xlabel("E(true one-hot) - min E(other one-hot)")
    ax2.set_title(f"true token lowest of {m['n_compared']} one-hots at "
                  f"{100 * m['frac_true_lowest']:.1f}% of positions", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_ylabel("positions")
    return fig


def eval_figure(loss_k, loss_s1, bits_name: str, trained_k: int, dpi: int) -> Figure:
    fig = new_fig(6, 4, dpi)
    ax = fig.add_subplot()
    k = np.arange(len(loss_k))
    ax.plot(k, loss_k, "o-", label="val loss after k think steps")
    if loss_s1 is not None:
        ax.axhline(loss_s1, color="k", ls="--", lw=1, label=f"System 1: {loss_s1:.4f}")
    ax.axvline(trained_k, color="0.6", ls=":", label=f"trained with think_steps={trained_k}")
    ax.set_xlabel("think step k")
    ax.set_ylabel("val loss (nats/token)")
    sec = ax.secondary_yaxis("right", functions=(lambda v: v / math.log(2),
                                                 lambda v: v * math.log(2)))
    sec.set_ylabel(f"val {bits_name}")
    ax.legend(fontsize=8)
    ax.set_title("thinking curve (same val batches for every k)", fontsize=9)
    return fig
