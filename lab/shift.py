"""Evaluation sets: fixed windows of any text, and graded shifts away from the training text.

Every set is a batch of fixed windows (x, y) plus a mask of the target positions that count, so
each think step k is scored on exactly the same predictions (paired). The sets:

    val            the val split
    train_seen     training-split windows whose every target was a target of a window the run
    train_unseen   sampled / never sampled (replayed from the checkpoint's sampler record)
    corrupt_NN     val windows with NN% of the tokens replaced by other random tokens; only clean
                   targets whose previous token is clean are scored, so the target distribution
                   is unchanged and only the context is shifted
    lower          val lowercased (char vocabularies)

and any text file or parquet folder (`texts=`), tokenised with the checkpoint's tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lab.coverage import target_coverage
from nanoebm.tokenizer import CharTokenizer

BUILTIN_SETS = ("val", "train_seen", "train_unseen", "corrupt_02", "corrupt_05", "corrupt_10",
                "corrupt_20", "lower")
MAX_COVERAGE = 1 << 26  # train_seen/unseen look at the first 67M training tokens at most


@dataclass
class EvalSet:
    name: str
    x: torch.Tensor              # (N, T) inputs
    y: torch.Tensor              # (N, T) targets
    mask: torch.Tensor           # (N, T) bool: the target positions that are scored
    note: str = ""
    text: str | None = None      # char vocabularies: the token stream as a string
    pos: np.ndarray | None = None  # (N, T) index of each target in `text`


def window_starts(n_tokens: int, T: int, n: int, what: str = "text") -> np.ndarray:
    """n evenly spaced window starts (fewer when the text has fewer distinct windows)."""
    last = n_tokens - T - 1
    if last < 0:
        raise ValueError(f"{what} has {n_tokens} tokens, shorter than one window of "
                         f"{T + 1}: give a longer text")
    return np.unique(np.linspace(0, last, min(n, last + 1)).round().astype(np.int64))


def windows(ids: np.ndarray, starts: np.ndarray, T: int):
    """x = ids[s:s+T], y = ids[s+1:s+T+1] per start: (N, T) int64 each, plus target positions."""
    pos = starts[:, None] + 1 + np.arange(T)[None]  # (N, T) stream index of each target
    ids = np.asarray(ids)
    return torch.from_numpy(ids[pos - 1].astype(np.int64)), torch.from_numpy(ids[pos].astype(np.int64)), pos


def stream_set(name: str, ids: np.ndarray, T: int, n: int, tok, note: str = "") -> EvalSet:
    x, y, pos = windows(ids, window_starts(len(ids), T, n, name), T)
    text = tok.decode(ids) if isinstance(tok, CharTokenizer) else None
    return EvalSet(name, x, y, torch.ones_like(x, dtype=torch.bool), note, text, pos)


# ----------------------------------------------------------------------------- any text
def encode_char(tok: CharTokenizer, text: str, drop_unknown: bool, what: str) -> tuple[list, int]:
    """Char ids of text; characters outside the vocabulary are an error, or dropped."""
    unknown = sorted(set(text) - tok.stoi.keys())
    if unknown and not drop_unknown:
        shown = "".join(unknown[:20]) + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
        raise ValueError(f"{what} has {len(unknown)} characters outside the checkpoint's "
                         f"vocabulary: {shown!r}; set drop_unknown=true to drop them")
    ids = [tok.stoi[c] for c in text if c in tok.stoi]
    return ids, len(text) - len(ids)


def read_texts(path: Path) -> tuple[list[str], bool]:
    """(texts, is_docs): a UTF-8 file whole, or the documents of a parquet folder's shards."""
    from nanoebm.data import iter_texts, list_sources
    if not path.exists():
        raise FileNotFoundError(f"text not found: {path} (texts= takes UTF-8 files or folders "
                                "of .parquet shards)")
    if path.is_file():
        try:
            return [path.read_text(encoding="utf-8")], False
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}); convert it") from None
    return [t for src in list_sources(path, None) for texts, _ in iter_texts(src) for t in texts], True


def text_set(path: str, tok, T: int, n: int, drop_unknown: bool) -> EvalSet:
    """Windows of any text, tokenised with the checkpoint's tokenizer. Documents of a parquet
    folder are joined as in training: a newline (char) or EOT (BPE) before each."""
    from nanoebm.tokenizer import resolve_path
    p = resolve_path(path)
    texts, is_docs = read_texts(p)
    if isinstance(tok, CharTokenizer):
        text = "".join("\n" + t for t in texts) if is_docs else texts[0]
        ids, dropped = encode_char(tok, text, drop_unknown, str(p))
        note = f"dropped {dropped} unknown characters" if dropped else ""
    else:
        ids = [i for t in texts for i in ([tok.eot] if is_docs else []) + tok.encode(t)]
        note = ""
    return stream_set(p.name, np.array(ids, dtype=np.int64), T, n, tok, note)


# ------------------------------------------------------------------------ seen / unseen
def seen_sets(train_ids: np.ndarray, record: list, end_step: int, T: int, n: int, tok,
              names: tuple = ("train_seen", "train_unseen")) -> list[EvalSet]:
    """Training-split windows whose targets were all / never targets of a sampled window. When
    fewer than n such whole windows exist, windows are scored on the qualifying positions only."""
    train_ids = np.asarray(train_ids[:MAX_COVERAGE])  # a prefix of a huge corpus is exact too
    cov = target_coverage(record, end_step, len(train_ids))  # (n_tokens,) times each target was seen
    starts = np.arange(len(train_ids) - T)  # every window start
    text = tok.decode(train_ids) if isinstance(tok, CharTokenizer) else None
    out = []
    for name, want in zip(("train_seen", "train_unseen"), (True, False)):
        if name not in names:
            continue
        hit = (cov > 0) == want  # (n_tokens,) positions that belong to this set
        run = np.convolve(hit[1:].astype(np.int64), np.ones(T, np.int64), "valid")  # targets hit per start
        whole = starts[run[starts] == T]
        if len(whole) >= n:
            x, y, pos = windows(train_ids, whole[np.linspace(0, len(whole) - 1, n).round().astype(int)], T)
            out.append(EvalSet(name, x, y, torch.ones_like(x, dtype=torch.bool), "", text, pos))
            continue
        part = starts[run[starts] > 0]
        if len(part) == 0:
            raise ValueError(f"{name}: no training position qualifies (coverage "
                             f"{(cov > 0).mean():.1%}); drop it from sets")
        x, y, pos = windows(train_ids, part[np.linspace(0, len(part) - 1, min(n, len(part))).round().astype(int)], T)
        mask = torch.from_numpy(hit[pos])
        note = (f"only {len(whole)} whole windows qualify: scored on the {int(mask.sum())} "
                f"{'sampled' if want else 'never-sampled'} target positions of {len(x)} windows")
        out.append(EvalSet(name, x, y, mask, note, text, pos))
    return out


# ------------------------------------------------------------------------- graded shift
def corrupt_set(name: str, val_ids: np.ndarray, T: int, n: int, frac: float, vocab: int,
                seed: int, tok) -> EvalSet:
    """val windows with exactly round(frac * tokens) tokens replaced by a different uniformly
    random token; scored where the target and the token before it are clean."""
    starts = window_starts(len(val_ids), T, n, "val")
    pos = starts[:, None] + np.arange(T + 1)[None]  # (N, T+1) the window's stream tokens
    w = torch.from_numpy(np.asarray(val_ids)[pos].astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    hit = torch.zeros(w.numel(), dtype=torch.bool)
    hit[torch.randperm(w.numel(), generator=g)[:round(frac * w.numel())]] = True
    hit = hit.view(w.shape)  # (N, T+1)
    shift = torch.randint(1, vocab, w.shape, generator=g)  # never 0: a replacement always differs
    w = torch.where(hit, (w + shift) % vocab, w)
    mask = ~hit[:, 1:] & ~hit[:, :-1]  # clean target, clean previous token
    text = tok.decode(val_ids) if isinstance(tok, CharTokenizer) else None
    return EvalSet(name, w[:, :-1], w[:, 1:], mask, f"{hit.float().mean():.4f} of tokens replaced",
                   text, pos[:, 1:])


def lower_set(val_ids: np.ndarray, T: int, n: int, tok) -> EvalSet | None:
    """The val split lowercased (char vocabularies only; None otherwise)."""
    if not isinstance(tok, CharTokenizer):
        return None
    ids, dropped = encode_char(tok, tok.decode(val_ids).lower(), True, "lowercased val")
    note = f"dropped {dropped} characters without a lowercase form in the vocabulary" if dropped else ""
    return stream_set("lower", np.array(ids, dtype=np.int64), T, n, tok, note)


def corrupt_fraction(name: str) -> float:
    return int(name.split("_")[1]) / 100


def check_set_names(names) -> None:
    bad = [s for s in names if s not in BUILTIN_SETS]
    if bad:
        raise ValueError(f"unknown set(s) {bad}: choose from {list(BUILTIN_SETS)} (any other text "
                         "goes in texts=[...])")


def builtin_sets(names, data, ckpt: dict, tok, T: int, n: int, seed: int) -> tuple[list, list]:
    """The named built-in sets of a checkpoint's own data. Returns (sets, notes)."""
    check_set_names(names)
    sets, notes = [], []
    for name in names:
        if name == "val":
            sets.append(stream_set("val", np.asarray(data.val), T, n, tok))
        elif name.startswith("corrupt_"):
            sets.append(corrupt_set(name, np.asarray(data.val), T, n, corrupt_fraction(name),
                                    tok.vocab_size, seed, tok))
        elif name == "lower":
            s = lower_set(np.asarray(data.val), T, n, tok)
            sets += [s] if s is not None else []
            notes += [] if s is not None else ["lower: skipped (only char vocabularies have case)"]
    wanted = tuple(s for s in names if s.startswith("train_"))
    if wanted:
        record = ckpt.get("sampler")
        if not record or record[0]["start_step"] != 0:
            raise ValueError(f"{', '.join(wanted)} need the checkpoint's sampler record, which this "
                             "checkpoint lacks (runs trained from scratch by this version of train.py"
                             " have it): drop them from sets")
        if record[-1]["high"] != len(data.train) - record[-1]["block"] - 1:
            raise ValueError("the training split differs from the one the run sampled (data file "
                             "changed?): point data_path at the run's data")
        sets += seen_sets(np.asarray(data.train), record, ckpt["step"], T, n, tok, wanted)
    order = {s: i for i, s in enumerate(names)}
    return sorted(sets, key=lambda s: order[s.name]), notes
