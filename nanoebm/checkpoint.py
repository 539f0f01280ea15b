"""Checkpoints: atomic writes, weights_only loads, tolerant config restore.

A checkpoint is a plain dict of tensors and Python primitives (no pickled classes), so it loads
with torch.load(weights_only=True) on any recent PyTorch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from nanoebm.config import ModelConfig
from nanoebm.model import EBT


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


def model_config_from_dict(d: dict) -> ModelConfig:
    """Build a ModelConfig, ignoring keys this version no longer has (old checkpoints load)."""
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


def model_from_checkpoint(ckpt: dict, device="cpu") -> EBT:
    model = EBT(model_config_from_dict(ckpt["model_config"]))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model.to(device)


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The newest finished run's final.pt under out_dir, by modification time (not by name)."""
    out_dir = Path(os.path.expanduser(str(out_dir)))
    finals = [p for p in out_dir.glob("run_*/final.pt") if p.is_file()]
    if not finals:
        raise FileNotFoundError(f"no finished run under {out_dir}/ (train with `python train.py`"
                                " or pass checkpoint=PATH)")
    return max(finals, key=lambda p: p.stat().st_mtime)
