"""Checkpoints: atomic writes, weights_only loads, tolerant config restore.

A checkpoint is a plain dict of tensors and Python primitives (no pickled classes), so it loads
with torch.load(weights_only=True) on any recent PyTorch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from nanoebm.config import ModelConfig, TrainRunConfig
from nanoebm.cli import LEGACY_ALIASES
from nanoebm.model import EBT
from nanoebm.runtime import set_rng_state


def atomic_save(obj, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash mid-write leaves the
    previous file intact (rename is atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_save for text files (results, generated data): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def point_link(link: Path, target: Path) -> None:
    """Atomically make `link` a relative symlink to `target` (a copy where symlinks fail)."""
    tmp = link.with_name(f".{link.name}.lnk{os.getpid()}")
    try:
        tmp.symlink_to(os.path.relpath(target, link.parent))
        os.replace(tmp, link)
    except OSError:
        if tmp.is_symlink():
            tmp.unlink()
        atomic_save(torch.load(target, map_location="cpu", weights_only=True), link)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a nanoebm checkpoint with a one-line error for missing or corrupt files."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with `python train.py` "
                                "or pass checkpoint=PATH)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, wrong format, pickled classes, ...
        raise ValueError(f"checkpoint {path} is corrupt or not a nanoebm checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a nanoebm checkpoint (no model/model_config)")
    return ckpt


# Options that never paid, taken out of the code (lab/LOG.md): their values that change nothing.
# A checkpoint trained with another value needs the commit that still runs them.
REMOVED_AT = "14f00f5adb7bca1226df3bcbb3bf6292db90d486"
REMOVED_OPTIONS = {"think_start_scale": 1.0, "think_start_noise": 0.0, "think_mixed_starts": 0.0,
                   "think_free_steps": 0, "value_align_weight": 0.0, "residual_nce_weight": 0.0,
                   "crossfit_every": 0, "think_lr_per_step": False, "think_improve_weight": 0.0,
                   "think_normalize_grad": False, "tie_candidate_embedding": False,
                   "think_loss": "mean"}


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from a checkpoint's dict: renamed options map onto their current names
    and options this version no longer has are dropped, so old checkpoints load, unless a
    removed option was on (then the model cannot be rebuilt here: a one-line error)."""
    d = dict(d)
    for key, off in REMOVED_OPTIONS.items():
        if d.get(key, off) != off:
            raise ValueError(f"this checkpoint was trained with model.{key}={d[key]}, an option "
                             f"removed after commit {REMOVED_AT[:7]}: run it there "
                             f"(git checkout {REMOVED_AT[:7]})")
    for key in list(d):
        new, inverted = LEGACY_ALIASES.get(f"model.{key}", (None, False))
        if new is not None:
            value = d.pop(key)
            d.setdefault(new.split(".", 1)[1], (not value) if inverted else value)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})


def clean_state_dict(sd: dict) -> dict:
    """Strip wrappers' prefixes (torch.compile's _orig_mod., DDP's module.) if any slipped in."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def fit_state_dict(sd: dict, model: EBT) -> dict:
    """The checkpoint's weights as `model` expects them. A baseline (think_steps=0) saved before
    the plain transformer dropped its unused candidate stream still carries those tensors."""
    sd = clean_state_dict(sd)
    if model.has_energy:
        return sd
    keep = model.state_dict()
    return {k: v for k, v in sd.items() if k in keep}


def model_from_checkpoint(ckpt: dict, device="cpu", **overrides) -> EBT:
    """The checkpoint's model. overrides: thinking options (e.g. think_neutral) to use instead of
    the checkpoint's; None keeps its setting."""
    cfg = model_config_from_dict(ckpt["model_config"])
    model = EBT(dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}))
    model.load_state_dict(fit_state_dict(ckpt["model"], model))
    return model.to(device)


# ------------------------------------------------------------------------ resuming training
def resume_config(cfg: TrainRunConfig, ckpt: dict, data_meta: dict,
                  cli_keys: frozenset = frozenset()) -> TrainRunConfig:
    """The run's config with the checkpoint's architecture (not the command line's) and its
    window shape (unless cli_keys, the options given on the command line, name data.block_size or
    data.batch_size), once the data is known to have the checkpoint's vocabulary."""
    saved = (ckpt.get("config") or {}).get("data", {})
    shape = {k: saved[k] for k in ("block_size", "batch_size") if k in saved and f"data.{k}" not in cli_keys}
    cfg = dataclasses.replace(cfg, model=model_config_from_dict(ckpt["model_config"]),
                              data=dataclasses.replace(cfg.data, **shape))
    vocab_id = lambda m: (m.get("tokenizer"), m.get("sha256") or m.get("chars"))  # noqa: E731
    if vocab_id(ckpt["meta"]) != vocab_id(data_meta):  # same vocabulary, however named
        raise ValueError(f"{cfg.load_checkpoint} was trained on a different vocabulary than "
                         f"{cfg.data.data_path}: resume with the same data.* settings")
    return cfg


def restore_training(ckpt: dict, model: EBT, opt, data_gen, shaping, rank: int, device) -> int:
    """Load weights, AdamW moments, this rank's random streams and energy-shaping state (a
    checkpoint saved by more ranks than now: the last one's). Returns the step to go on from."""
    if set(clean_state_dict(ckpt["model"])) != set(model.state_dict()):
        raise ValueError("this baseline keeps the unused candidate stream that baselines had "
                         f"before commit 14be9ae: resume it there (it loads here for sampling)")
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)], data_gen)
    if "shaping" in ckpt:
        shaping.load_state_dict(ckpt["shaping"][min(rank, len(ckpt["shaping"]) - 1)], device)
    return ckpt["step"]


def carry_metrics(ckpt_path: str | Path, run_dir: Path, step: int) -> None:
    """Start the resumed run's metrics.jsonl with the old run's rows up to the resume point."""
    src = Path(ckpt_path).expanduser().resolve().parent / "metrics.jsonl"
    if src.exists():
        rows = [r for r in src.read_text().splitlines() if json.loads(r).get("step", 0) <= step]
        (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))


# The trained models shipped in checkpoints/ (half-precision weights; lab/bundle.py writes them)
BUNDLED = {name: Path(__file__).resolve().parent.parent / "checkpoints" / f"shakespeare_char_{kind}.pt"
           for name, kind in (("bundled", "ebt"), ("bundled_baseline", "baseline"))}


def open_checkpoint(name: str | None, out_dir: str | Path) -> tuple[Path, dict, str]:
    """(path, checkpoint, the line a script prints first) for checkpoint=NAME: a path, bundled
    or bundled_baseline, or None: the newest finished run under out_dir, else the bundled EBT."""
    runs = [p for p in Path(out_dir).expanduser().glob("run_*/final.pt") if p.is_file()]
    if name is None and not runs:
        if not BUNDLED["bundled"].exists():
            raise FileNotFoundError(f"no finished run under {out_dir}/ (train with `python train.py`"
                                    " or pass checkpoint=PATH)")
        name = "bundled"
    # no name: the newest finished run, by modification time (not by name)
    newest = lambda: max(runs, key=lambda p: p.stat().st_mtime)  # noqa: E731
    path = BUNDLED.get(name) or (Path(name).expanduser() if name else newest())
    ck = load_checkpoint(path)
    if name in BUNDLED:
        what = "EBT" if name == "bundled" else "plain-transformer baseline"
        return path, ck, (f"using the bundled {ck.get('step', '?')}-step {what} (checkpoints/{path.name}): "
                          "train your own with `uv run python train.py experiment=cpu`")
    of = (ck.get("config") or {}).get("train", {}).get("max_steps", "?")
    why = f", the newest finished run under {out_dir}/" if name is None else ""
    return path, ck, (f"using {path} (step {ck.get('step', '?')} of {of}, written "
                      f"{(time.time() - path.stat().st_mtime) / 3600:.1f} h ago{why})")
