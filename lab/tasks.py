"""Structured character tasks: text files where the next character is often *determined*.

On free text a softmax already outputs a full next-character distribution; on these tasks many
next characters are fixed by structure the model has to track, so checking a candidate against
the context may be easier than producing it (the EBT paper's Dyck result, Table 2).

    uv run python -m lab.tasks                          # writes ~/.cache/nanoebm/tasks/*.txt
    uv run python train.py experiment=dyck_cpu          # trains on dyck-train.txt there
    uv run python train.py experiment=arith_cpu         # arith-train.txt

One example per line. Each task has a train file (train + val: the loader holds out its last
data.val_fraction) and an out-of-distribution (OOD) file, both made from a seeded generator on
`task_files`, so equal seeds and specs give identical bytes.

* dyck (Dyck-k, k=4 bracket pairs `()[]{}<>`): a line's max nesting depth d is uniform on the
  split's depth range, its length n uniform over the even numbers in [max(2d, min length), max
  length]. The line is a walk of n moves: each move opens (a uniformly random bracket type) or
  closes the innermost open bracket, with probability 1/2 each among the moves that keep the line
  completable to length n with max depth exactly d.
  Train/val: depth 1-8, length 2-60. OOD: depth 9-16, length 62-120 (deeper and longer).
* arith (addition `a+b=c`, c = a + b in decimal): each operand's digit count is uniform on the
  split's range, its value uniform among the numbers with that many digits (0-9 for one digit).
  Train/val: 1-4 digit operands. OOD: 5-6 digit operands.

Determined positions (the target character is fixed by what comes before it):
* dyck: targets that are closing brackets. Whether to close is free, but which bracket closes is
  fixed by the stack of open brackets. Opening brackets and newlines are free.
* arith: the answer digits after `=` and the newline that ends the answer.
`determined_mask` finds them in (B, T) target windows; `dyck_expected`, `dyck_window_closers`
and `arith_answer_span` give the right answers, `arith_exact_match` scores whole answers.

Files live in ~/.cache/nanoebm/tasks (or the folder given), named `<task>-<split>.txt` for the
default seed and spec and `<task>-seed<seed>-<key>-<split>.txt` otherwise (the key hashes the
generator version, seed and spec).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoebm.checkpoint import atomic_write_text
from nanoebm.tokenizer import resolve_path

VERSION = 1          # bump when the generator changes: new cache keys, new files
BRACKETS = "()[]{}<>"
CLOSE_OF = dict(zip(BRACKETS[0::2], BRACKETS[1::2]))  # opener -> its closer
CLOSERS = BRACKETS[1::2]
DATA_SEED = 0        # one data set for every training seed: runs of a comparison see the same lines


@dataclass(frozen=True)
class DyckSpec:
    k: int = 4                      # bracket pairs, the first k of ()[]{}<>
    n_train: int = 20000            # lines in the train file (its tail is the val split)
    n_ood: int = 2000
    depth: tuple = (1, 8)           # max nesting depth of a line, inclusive range
    length: tuple = (2, 60)         # characters before the newline
    ood_depth: tuple = (9, 16)
    ood_length: tuple = (62, 120)


@dataclass(frozen=True)
class ArithSpec:
    n_train: int = 20000
    n_ood: int = 2000
    digits: tuple = (1, 4)          # digit count of each operand, inclusive range
    ood_digits: tuple = (5, 6)


TASK_CONFIGS = {"dyck": DyckSpec, "arith": ArithSpec}


# ------------------------------------------------------------------------------ generators
def dyck_line(rng: random.Random, n: int, d: int, k: int = 4) -> str:
    """A balanced line of n brackets (n even) whose max nesting depth is exactly d <= n/2."""
    out, stack, reached = [], [], False
    for i in range(n):
        h, r = len(stack), n - i  # current depth, moves left
        can_open = h < d and h + 1 <= r - 1  # room to open and still close everything
        # closing must leave room to climb to depth d and come back, unless d was reached
        can_close = h > 0 and (reached or r - 1 >= 2 * d - (h - 1))
        if can_open and (not can_close or rng.random() < 0.5):
            j = rng.randrange(k)  # bracket type
            out.append(BRACKETS[2 * j])
            stack.append(BRACKETS[2 * j + 1])
            reached = reached or len(stack) == d
        else:
            out.append(stack.pop())
    return "".join(out)


def dyck_lines(rng: random.Random, n_lines: int, depth: tuple, length: tuple, k: int) -> list[str]:
    lines = []
    for _ in range(n_lines):
        d = rng.randint(*depth)
        lo = max(2 * d, length[0] + length[0] % 2)  # smallest even length that fits depth d
        if lo > length[1]:
            raise ValueError(f"depth {d} needs lines of {2 * d} characters, longer than the "
                             f"length range {length}: widen it")
        lines.append(dyck_line(rng, 2 * rng.randint(lo // 2, length[1] // 2), d, k))
    return lines


def arith_lines(rng: random.Random, n_lines: int, digits: tuple) -> list[str]:
    def operand():
        n = rng.randint(*digits)
        return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10 ** n)
    return [f"{a}+{b}={a + b}" for a, b in ((operand(), operand()) for _ in range(n_lines))]


def task_lines(name: str, split: str, seed: int, spec) -> list[str]:
    """The lines of one split; each split has its own random stream (same seed, same lines)."""
    rng = random.Random(f"{name}:{split}:{seed}")  # str seeds hash with sha512: stable
    train = split == "train"
    n = spec.n_train if train else spec.n_ood
    if name == "dyck":
        if not 1 <= spec.k <= len(BRACKETS) // 2:
            raise ValueError(f"dyck k={spec.k}: use 1..{len(BRACKETS) // 2} bracket pairs")
        depth, length = (spec.depth, spec.length) if train else (spec.ood_depth, spec.ood_length)
        return dyck_lines(rng, n, depth, length, spec.k)
    return arith_lines(rng, n, spec.digits if train else spec.ood_digits)


# ------------------------------------------------------------------------------------ files
DEFAULT_DIR = "~/.cache/nanoebm/tasks"  # where configs/data/dyck.yaml and arith.yaml read them
FILE = re.compile(r"(dyck|arith)-(?:seed\d+-[0-9a-f]+-)?(train|ood)\.txt$")


def task_files(name: str, seed: int = DATA_SEED, cache_dir: str | None = None,
               **spec_overrides) -> dict[str, Path]:
    """Write task `name` (dyck | arith): {"train": Path, "ood": Path} in cache_dir (default
    DEFAULT_DIR). The default seed and spec give <name>-train.txt / <name>-ood.txt (what the
    presets train on); any other seed or spec gets its own names. A file already holding the
    same bytes is left alone; a stale one is replaced."""
    if name not in TASK_CONFIGS:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(TASK_CONFIGS)}")
    spec = TASK_CONFIGS[name](**spec_overrides)
    key = hashlib.sha1(json.dumps([VERSION, name, seed, dataclasses.asdict(spec)]).encode())
    default = seed == DATA_SEED and not spec_overrides
    root = resolve_path(cache_dir or DEFAULT_DIR)
    tag = name if default else f"{name}-seed{seed}-{key.hexdigest()[:12]}"
    paths = {s: root / f"{tag}-{s}.txt" for s in ("train", "ood")}
    texts = {s: "".join(line + "\n" for line in task_lines(name, s, seed, spec)) for s in paths}
    missing = set(texts["ood"]) - set(texts["train"])
    if missing:  # a char model trained on the train file could not read the OOD file
        raise ValueError(f"{name}: the train split lacks characters of the OOD split "
                         f"{sorted(missing)!r}: raise n_train")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write task files in {root} ({e.strerror}): pass another "
                         "folder") from None
    for s, path in paths.items():
        if not path.exists() or path.read_text() != texts[s]:
            atomic_write_text(path, texts[s])
    return paths


def task_name(data_path: str) -> str | None:
    """`dyck` for a task file (dyck-train.txt, dyck-ood.txt, ...); None for any other path."""
    m = FILE.search(str(data_path))
    return m.group(1) if m else None


def ood_path(data_path: str) -> Path:
    """The OOD file beside a task's train file."""
    return resolve_path(re.sub(r"-train\.txt$", "-ood.txt", str(data_path)))


def write_missing(data_path: str) -> None:
    """Before training on a task file that is not there yet: write the default task files."""
    name, path = task_name(data_path), resolve_path(str(data_path))
    if name is not None and not path.exists():
        task_files(name, cache_dir=str(path.parent))


# ---------------------------------------------------------------------- determined positions
def determined_mask(task: str, targets: torch.Tensor, chars: list[str]) -> torch.Tensor:
    """(B, T) bool: is the target character at each position determined by what precedes it?
    targets: (B, T) ids of a char tokenizer with vocabulary `chars` (tokenizer.chars). Needs no
    context before the window (dyck: the target is a closer; arith: see arith_mask)."""
    if task == "dyck":
        closers = torch.tensor([c in CLOSERS for c in chars], device=targets.device)
        return closers[targets]  # (B, T)
    if task == "arith":
        return arith_mask(targets, chars)
    raise ValueError(f"unknown task {task!r}: use one of {sorted(TASK_CONFIGS)}")


def arith_mask(targets: torch.Tensor, chars: list[str]) -> torch.Tensor:
    """(B, T) bool: answer digits and the newline ending them, in windows cut anywhere. A digit's
    role comes from the nearest structural character: the last one before it (`=`: answer), or
    if the window has none before it, the first one after it (`\\n`: answer). A window with no
    `+`, `=` or newline at all (shorter than any line) is marked False."""
    role = torch.tensor([{"+": 1, "=": 2, "\n": 3}.get(c, 0) for c in chars],
                        device=targets.device)[targets]  # (B, T) 0 = digit
    B, T = targets.shape
    pos = torch.arange(T, device=targets.device).expand(B, T)  # (B, T)
    last = torch.cummax(torch.where(role > 0, pos, -1), dim=1).values  # last structural <= t
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # ... < t
    role_before = torch.where(before >= 0, role.gather(1, before.clamp(min=0)), 0)  # (B, T)
    first = torch.cummin(torch.where(role > 0, pos, T).flip(1), dim=1).values.flip(1)  # >= t
    role_after = torch.where(first < T, role.gather(1, first.clamp(max=T - 1)), 0)  # (B, T)
    answer_digit = (role == 0) & ((role_before == 2) | ((role_before == 0) & (role_after == 3)))
    return answer_digit | (role == 3)


def determined_positions(task: str, line: str) -> list[bool]:
    """Reference for one whole line (with or without its newline): per character, is it
    determined given the line before it? Dyck runs the bracket stack and rejects unbalanced
    lines; arith parses `a+b=c` and rejects wrong sums."""
    if task == "dyck":
        stack, mask = [], []
        for ch in line.removesuffix("\n"):
            if ch in CLOSE_OF:
                stack.append(CLOSE_OF[ch])
            elif not stack or ch != stack.pop():
                raise ValueError(f"not a balanced Dyck line: {line!r}")
            mask.append(ch not in CLOSE_OF)
        if stack:
            raise ValueError(f"not a balanced Dyck line (unclosed brackets): {line!r}")
        return mask + [False] * line.endswith("\n")
    if task == "arith":
        start, end = arith_answer_span(line)
        return [start <= i <= end for i in range(len(line))]  # end: the newline, if present
    raise ValueError(f"unknown task {task!r}: use one of {sorted(TASK_CONFIGS)}")


def dyck_expected(text: str) -> list[str | None]:
    """Per position i, the closer the bracket stack of text[:i] demands (the innermost open
    bracket's), None where nothing is open. A closer pops whether or not it matches (so this
    scores generated text too); a newline empties the stack. On valid data expected[i] equals
    text[i] at every closer, so accuracy on determined positions is argmax == target."""
    stack, out = [], []
    for ch in text:
        out.append(stack[-1] if stack else None)
        if ch in CLOSE_OF:
            stack.append(CLOSE_OF[ch])
        elif ch == "\n":
            stack.clear()
        elif stack:
            stack.pop()
    return out


def dyck_window_closers(inputs: torch.Tensor, targets: torch.Tensor,
                        chars: list[str]) -> torch.Tensor:
    """(B, T) long: the id of the closer the stack demands at each closing-bracket target whose
    opener is visible in the window (inputs[b, :t+1]), else -1. Openers before the window start
    are unknown, so fewer positions than determined_mask; on valid data the id equals targets."""
    stoi = {c: i for i, c in enumerate(chars)}
    out = torch.full_like(targets, -1)
    for b, (x, y) in enumerate(zip(inputs.tolist(), targets.tolist())):
        text = "".join(chars[i] for i in x) + chars[y[-1]]  # the window and its last target
        for t, (e, ch) in enumerate(zip(dyck_expected(text)[1:], text[1:])):
            if e is not None and ch in CLOSERS:
                out[b, t] = stoi[e]
    return out


# -------------------------------------------------------------------------------- arith answers
ARITH_LINE = re.compile(r"(\d+)\+(\d+)=(\d+)\n?")


def arith_answer_span(line: str) -> tuple[int, int]:
    """(start, end) of the answer c in `a+b=c` (line[start:end] == c); rejects wrong sums."""
    m = ARITH_LINE.fullmatch(line)
    if not m or int(m[1]) + int(m[2]) != int(m[3]):
        raise ValueError(f"not a correct addition line a+b=c: {line!r}")
    return m.start(3), m.end(3)


def arith_exact_match(complete, lines: list[str], prefix: str = "\n") -> dict:
    """Exact match of whole answers: for each line `a+b=c`, complete(prefix + "a+b=") must
    return text starting with `c` and a newline (so generate at least len(c) + 1 characters;
    8 covers every split). prefix: what precedes a line in the files (a newline)."""
    correct = 0
    for line in lines:
        start, end = arith_answer_span(line)
        correct += complete(prefix + line[:start]).startswith(line[start:end] + "\n")
    return {"exact_match": correct / max(len(lines), 1), "correct": correct, "n": len(lines)}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write the structured task files (train + OOD).")
    ap.add_argument("tasks", nargs="*", default=sorted(TASK_CONFIGS), help="dyck, arith (default: both)")
    ap.add_argument("--out", default=DEFAULT_DIR, help=f"folder (default {DEFAULT_DIR})")
    args = ap.parse_args()
    for t in args.tasks:
        for split, path in task_files(t, cache_dir=args.out).items():
            print(f"{t} {split}: {path}")
