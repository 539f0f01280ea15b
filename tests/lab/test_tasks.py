"""Structured tasks (lab/tasks.py): the generated files, the determined-position masks
against hand-written lines and a stack reference, arith exact match, and both presets training.

    uv run pytest tests/lab/test_tasks.py
"""
import math
import re
from itertools import accumulate
from pathlib import Path

import pytest
import torch

from lab import tasks
from nanoebm.config import DataConfig
from nanoebm.data import load_data
from nanoebm.tokenizer import CharTokenizer
from tests.conftest import SMALL, compose


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One folder with the default (shipped) task files, shared by the tests below."""
    return tmp_path_factory.mktemp("tasks")


def lines(cache, name, split):
    return tasks.task_files(name, cache_dir=str(cache))[split].read_text().splitlines()


def bracket_depth(line: str) -> int:
    """Max nesting depth, or -1 if unbalanced: strip matched pairs until nothing is left."""
    rest = line
    while (shorter := re.sub(r"\(\)|\[\]|\{\}|<>", "", rest)) != rest:
        rest = shorter
    if rest:
        return -1
    return max(accumulate(1 if c in "([{<" else -1 for c in line))  # open brackets after each


# ------------------------------------------------------------------------------ generator
def test_generator_deterministic_per_seed(tmp_path):
    small = dict(n_train=300, n_ood=40)
    for name in ("dyck", "arith"):
        a = tasks.task_files(name, seed=3, cache_dir=str(tmp_path / "a"), **small)
        b = tasks.task_files(name, seed=3, cache_dir=str(tmp_path / "b"), **small)
        c = tasks.task_files(name, seed=4, cache_dir=str(tmp_path / "a"), **small)
        for split in ("train", "ood"):
            assert a[split].read_bytes() == b[split].read_bytes()
            assert a[split].read_bytes() != c[split].read_bytes()
            assert a[split].name == b[split].name != c[split].name
        # another spec: other file names, not a stale file
        d = tasks.task_files(name, seed=3, cache_dir=str(tmp_path / "a"), n_train=301, n_ood=40)
        assert d["train"] != a["train"] and len(d["train"].read_text().splitlines()) == 301
    assert not list(tmp_path.rglob("*.tmp*"))  # temp files renamed into place


def test_dyck_lines_balanced_within_their_split(cache):
    train, ood = lines(cache, "dyck", "train"), lines(cache, "dyck", "ood")
    assert (len(train), len(ood)) == (20000, 2000)
    for split, ls, (d_lo, d_hi), (n_lo, n_hi) in (("train", train, (1, 8), (2, 60)),
                                                  ("ood", ood, (9, 16), (62, 120))):
        depths = [bracket_depth(s) for s in ls]
        assert min(depths) == d_lo and max(depths) == d_hi, split  # balanced (no -1), in range
        assert set(depths) == set(range(d_lo, d_hi + 1)), split
        assert n_lo <= min(map(len, ls)) and max(map(len, ls)) <= n_hi, split
    assert set("".join(ood)) <= set("".join(train)) == set(tasks.BRACKETS)


def test_arith_lines_are_correct_sums_with_the_split_digit_counts(cache):
    for split, (lo, hi) in (("train", (1, 4)), ("ood", (5, 6))):
        digits = set()
        for line in lines(cache, "arith", split):
            a, b, c = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups()
            assert int(a) + int(b) == int(c) and str(int(c)) == c, line
            assert all(s == str(int(s)) for s in (a, b)), line  # no leading zeros
            digits |= {len(a), len(b)}
        assert digits == set(range(lo, hi + 1)), split
    train = tasks.task_files("arith", cache_dir=str(cache))["train"].read_text()
    assert set(train) == set("0123456789+=\n")


# ------------------------------------------------------------------ determined positions
HAND = {  # line -> which characters are determined given what precedes them
    "dyck": {"([]<>)\n": "FFTFTTF", "{<>}()\n": "FFTTFTF", "<<[]>>\n": "FFFTTTF", "()\n": "FTF"},
    "arith": {"12+3=15\n": "FFFFFTTT", "0+0=0\n": "FFFFTT", "999+1=1000\n": "FFFFFFTTTTT"},
}


@pytest.mark.parametrize("task", ["dyck", "arith"])
def test_determined_positions_hand_written(task):
    for line, expected in HAND[task].items():
        assert tasks.determined_positions(task, line) == [e == "T" for e in expected], line


@pytest.mark.parametrize("task", ["dyck", "arith"])
def test_determined_mask_in_windows_cut_anywhere(task):
    text = "".join(HAND[task]) * 2
    tok = CharTokenizer(sorted(set(text)))
    ids = torch.tensor(tok.encode(text))
    ref = [m for line in HAND[task] for m in tasks.determined_positions(task, line)] * 2
    for T in (5, 8, 16):  # every window of length T (here <= 4 digits in a row: each has a
        #                   structural character; a window of digits alone is marked False)
        y = torch.stack([ids[i:i + T] for i in range(len(ids) - T + 1)])  # (B, T)
        want = torch.tensor([ref[i:i + T] for i in range(len(ids) - T + 1)])  # (B, T)
        assert torch.equal(tasks.determined_mask(task, y, tok.chars), want), T
    if task == "arith":
        assert not tasks.determined_mask(task, torch.tensor([tok.encode("1000")]), tok.chars).any()


def test_bad_lines_and_tasks_are_rejected():
    for line in ("(]\n", "((\n", "())\n", "(a)\n"):
        with pytest.raises(ValueError, match="not a balanced Dyck line"):
            tasks.determined_positions("dyck", line)
    for line in ("1+1=3\n", "1+1=\n", "1+1\n"):
        with pytest.raises(ValueError, match="not a correct addition line"):
            tasks.determined_positions("arith", line)
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        tasks.determined_mask("sort", torch.zeros(1, 1, dtype=torch.long), ["a"])


def test_dyck_expected_closers():
    assert tasks.dyck_expected("([]<\n(") == [None, ")", "]", ")", ">", None]
    # a wrong closer still pops: generated text is scored closer by closer
    assert tasks.dyck_expected("(<)]") == [None, ")", ">", ")"]  # the wrong ")" popped "<"
    chars = sorted(tasks.BRACKETS + "\n")
    tok = CharTokenizer(chars)
    x, y = torch.tensor([tok.encode("])(<>")]), torch.tensor([tok.encode(")(<>)")])  # (1, 5)
    got = tasks.dyck_window_closers(x, y, chars)
    # ')' closes an opener before the window: unknown; '>' and ')' close visible openers
    assert got.tolist() == [[-1, -1, -1, tok.stoi[">"], tok.stoi[")"]]]


def test_dyck_window_closers_on_the_data(cache):
    text = "\n" + "\n".join(lines(cache, "dyck", "ood")[:40]) + "\n"
    tok = CharTokenizer(sorted(set(text)))
    ids = torch.tensor(tok.encode(text))
    T = 64
    starts = torch.arange(0, len(ids) - T - 1, 7)
    x = torch.stack([ids[i:i + T] for i in starts])  # (B, T)
    y = torch.stack([ids[i + 1:i + T + 1] for i in starts])  # (B, T)
    got = tasks.dyck_window_closers(x, y, tok.chars)
    mask = tasks.determined_mask("dyck", y, tok.chars)
    known = got >= 0
    assert torch.equal(got[known], y[known])  # the stack's closer is the data's
    assert not (known & ~mask).any() and (mask & ~known).any()  # some openers precede windows
    at_line_start = x[:, 0] == tok.stoi["\n"]  # everything visible: known == determined
    assert at_line_start.any() and torch.equal(known[at_line_start], mask[at_line_start])


# ------------------------------------------------------------------------------ exact match
def test_arith_exact_match_with_fake_completions():
    lines_ = ["12+3=15", "0+0=0", "999+1=1000", "40+2=42"]
    prompts = []

    def sum_when_first_is_even(prompt):
        prompts.append(prompt)
        a, b = map(int, prompt.strip().rstrip("=").split("+"))
        return f"{a + b}\n7+1=8" if a % 2 == 0 else f"{a + b + 1}\n"

    got = tasks.arith_exact_match(sum_when_first_is_even, lines_)
    assert got == {"exact_match": 0.75, "correct": 3, "n": 4}
    assert prompts == ["\n12+3=", "\n0+0=", "\n999+1=", "\n40+2="]
    # an answer must end: a prefix of the right digits, or no newline, is wrong
    assert tasks.arith_exact_match(lambda p: "15", ["12+3=15"])["correct"] == 0
    assert tasks.arith_exact_match(lambda p: "150\n", ["12+3=15"])["correct"] == 0
    assert tasks.arith_answer_span("12+3=15\n") == (5, 7)


# --------------------------------------------------------------------------- data and train
def test_task_files_are_plain_text_files_the_loader_reads(cache):
    files = tasks.task_files("dyck", cache_dir=str(cache))
    assert [p.name for p in files.values()] == ["dyck-train.txt", "dyck-ood.txt"]
    data = load_data(DataConfig(data_path=str(files["train"]), block_size=64))
    assert data.tokenizer.chars == sorted(tasks.BRACKETS + "\n")
    assert len(data.train) + len(data.val) == len(files["train"].read_text())
    assert math.isclose(len(data.val) / len(files["train"].read_text()), 0.1, abs_tol=1e-4)
    assert tasks.ood_path(str(files["train"])) == files["ood"]
    assert tasks.task_name(str(files["ood"])) == "dyck" and tasks.task_name("x.txt") is None
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        tasks.task_files("sort", cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match="lab.tasks"):
        load_data(DataConfig(data_path=str(cache / "nothing" / "dyck-train.txt")))
    before = files["train"].stat().st_mtime_ns  # the same bytes again: the file is left alone
    assert tasks.task_files("dyck", cache_dir=str(cache)) == files
    assert files["train"].stat().st_mtime_ns == before


@pytest.mark.parametrize("preset", ["dyck_cpu", "arith_cpu"])
def test_preset_trains_end_to_end(preset, cache, tmp_path):
    import train as train_mod
    from nanoebm.checkpoint import load_checkpoint
    task = preset.split("_")[0]
    assert compose(f"experiment={preset}").data.data_path == f"~/.cache/nanoebm/tasks/{task}-train.txt"
    tasks.write_missing(str(cache / f"{task}-train.txt"))  # what lab.compare does before training
    cfg = compose(f"experiment={preset}", *SMALL, f"data.data_path={cache}/{task}-train.txt",
                  f"out_dir={tmp_path}")
    summary = train_mod.train(cfg)
    assert summary["step"] == 2 and math.isfinite(summary["val_loss"])
    ck = load_checkpoint(Path(summary["run_dir"]) / "final.pt")
    train_text = tasks.task_files(preset.split("_")[0], cache_dir=str(cache))["train"].read_text()
    assert ck["meta"]["chars"] == sorted(set(train_text))
    # lab.evaluate writes the task metrics: determined vs free positions, in and out of distribution
    from lab import evaluate as ev
    from lab.config import EvalConfig
    res = ev.evaluate(EvalConfig(checkpoint=str(Path(summary["run_dir"]) / "final.pt"), sets=["val"], controls=False,
                                 windows=6, bootstrap=20, task_lines=3, device="cpu",
                                 out_dir=str(tmp_path / "ev")))
    groups = res["task"]["groups"]
    assert set(groups) == {"val", "ood"}
    for name in ("val", "ood"):
        det, free = groups[name]["determined"], groups[name]["free"]
        assert det["n_positions"] + free["n_positions"] == res["sets"][name]["n_positions"] > 0
        assert det["n_positions"] > 0 and len(det["acc_k"]) == res["steps"] + 1
    if preset == "arith_cpu":
        assert set(res["task"]["exact_match"]["ood"]) == {"n", "s1", "think", "bon"}
    assert "| ood | determined |" in (tmp_path / "ev" / "eval.md").read_text()
