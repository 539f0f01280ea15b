"""Data: a token stream per split and random (x, y) windows from it.

Character level: any UTF-8 text file; the vocabulary is the sorted set of its characters and is
stored in the checkpoint (`meta`), so sampling decodes with exactly the training vocabulary.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoebm.config import DataConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str) -> Path:
    """Expand ~ and env vars; a relative path missing from the cwd is tried at the repo root."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return p


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"text has characters outside the model's vocabulary: {unknown!r}; "
                             "remove them (the vocabulary is the training file's characters)")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    @property
    def meta(self) -> dict:
        return {"tokenizer": "char", "chars": self.chars}


def tokenizer_from_meta(meta: dict):
    """Rebuild the tokenizer recorded in a checkpoint."""
    if meta.get("tokenizer") == "char":
        return CharTokenizer(list(meta["chars"]))
    raise ValueError(f"unknown tokenizer in checkpoint meta: {meta.get('tokenizer')!r}")


@dataclass
class TokenData:
    train: np.ndarray          # 1-D token ids
    val: np.ndarray
    tokenizer: object
    bits_name: str             # "bpb" (bits per character) or "bpt" (bits per BPE token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def meta(self) -> dict:
        return self.tokenizer.meta

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator, device="cpu"):
        """Random windows: x = ids[i:i+T], y = ids[i+1:i+T+1], each (B, T) int64."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        x = np.stack([data[i:i + block_size] for i in starts.tolist()]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + block_size] for i in starts.tolist()]).astype(np.int64)
        x, y = torch.from_numpy(x), torch.from_numpy(y)  # (B, T) each
        if torch.device(device).type == "cuda":  # async host->device copies
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def load_char_text(path: Path, val_fraction: float) -> TokenData:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (set data.data_path=PATH to a UTF-8 "
                                "text file; the repo ships shakespeare.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it or pick another file") from None
    if not text:
        raise ValueError(f"data file is empty: {path}")
    tok = CharTokenizer(sorted(set(text)))
    ids = np.array(tok.encode(text), dtype=np.uint16 if tok.vocab_size < 2**16 else np.uint32)
    n_val = int(math.ceil(len(ids) * val_fraction))
    return TokenData(train=ids[:len(ids) - n_val], val=ids[len(ids) - n_val:], tokenizer=tok,
                     bits_name="bpb")


def load_data(cfg: DataConfig) -> TokenData:
    """Load the configured corpus and check it is long enough for data.block_size."""
    if cfg.tokenizer != "char":
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} is not supported yet: use char")
    frac = 0.1 if cfg.val_fraction is None else cfg.val_fraction
    if not 0 < frac < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {frac}")
    data = load_char_text(resolve_path(cfg.data_path), frac)
    for split, arr in (("train", data.train), ("val", data.val)):
        if len(arr) < cfg.block_size + 2:
            raise ValueError(f"{split} split has {len(arr)} tokens, too short for "
                             f"data.block_size={cfg.block_size}: lower data.block_size or use "
                             "a longer file")
    return data
