"""A new user's first minutes: which checkpoint a script uses and says it uses, a resume without
repeating the preset, the ETA, the thread count, a GPU-sized run on a CPU.

    uv run pytest tests/test_new_user.py
"""
import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

import train as train_mod
from nanoebm import checkpoint as C
from nanoebm import runtime as rt
from nanoebm.console import train_line
from tests.conftest import SMALL, compose


def test_open_checkpoint_says_which_run_step_and_age(tmp_path, monkeypatch):
    run = Path(train_mod.train(compose(*SMALL, f"out_dir={tmp_path}"))["run_dir"]) / "final.pt"
    os.utime(run, (time.time() - 7200, time.time() - 7200))  # written two hours ago
    path, ck, line = C.open_checkpoint(None, tmp_path)
    assert path == run and ck["step"] == 2
    assert line == f"using {run} (step 2 of 2, written 2.0 h ago, the newest finished run under {tmp_path}/)"
    path, _, line = C.open_checkpoint(str(run), "elsewhere")  # named: no "newest" clause
    assert line.startswith(f"using {run} (step 2 of 2, written ") and "newest" not in line


def test_no_run_anywhere_means_the_bundled_model_or_a_clear_error(tmp_path, monkeypatch):
    fake = {"bundled": tmp_path / "ebt.pt", "bundled_baseline": tmp_path / "base.pt"}
    monkeypatch.setattr(C, "BUNDLED", fake)
    with pytest.raises(FileNotFoundError, match="no finished run under"):  # nothing bundled
        C.open_checkpoint(None, tmp_path / "out_ebt")
    src = Path(train_mod.train(compose(*SMALL, f"out_dir={tmp_path / 'x'}"))["run_dir"]) / "final.pt"
    fake["bundled"].write_bytes(src.read_bytes())
    path, ck, line = C.open_checkpoint(None, tmp_path / "out_ebt")
    assert path == fake["bundled"] and ck["step"] == 2
    assert line.startswith("using the bundled 2-step EBT (checkpoints/ebt.pt): train your own with")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):  # named, not shipped
        C.open_checkpoint("bundled_baseline", tmp_path / "out_ebt")


def test_resume_takes_the_window_shape_from_the_checkpoint(tmp_path):
    """Resuming without repeating the preset: the default data.block_size (256) would exceed the
    checkpoint's model.block_size (16); the checkpoint's shape is used unless the command line
    sets one."""
    first = Path(train_mod.train(compose(*SMALL, f"out_dir={tmp_path / 'a'}"))["run_dir"])
    bare = compose("train.max_steps=3", "train.eval_iters=1", f"load_checkpoint={first / 'final.pt'}",
                   f"out_dir={tmp_path / 'b'}")
    assert bare.data.block_size == 256  # what the command line alone says
    s = train_mod.train(bare)
    assert s["step"] == 3
    ck = C.load_checkpoint(Path(s["run_dir"]) / "final.pt")
    assert (ck["config"]["data"]["block_size"], ck["config"]["data"]["batch_size"]) == (16, 2)
    asked = compose("train.max_steps=4", "train.eval_iters=1", "data.batch_size=3",
                    f"load_checkpoint={first / 'final.pt'}", f"out_dir={tmp_path / 'c'}")
    s = train_mod.train(asked, frozenset({"data.batch_size"}))
    assert C.load_checkpoint(Path(s["run_dir"]) / "final.pt")["config"]["data"]["batch_size"] == 3


def test_eta_waits_for_the_pace_after_the_first_steps(tmp_path, capsys):
    train_mod.train(compose(*SMALL, "train.max_steps=6", f"out_dir={tmp_path}"))
    etas = [ln.rsplit("eta ", 1)[1] for ln in capsys.readouterr().out.splitlines() if " eta " in ln]
    assert etas[:3] == ["?", "?", "?"] and all(e != "?" for e in etas[3:]) and len(etas) == 6
    row = {"step": 1, "loss": 1.0, "ce": 1.0, "ppl": 2.7, "bpb": 1.4, "lr": 1e-3, "tokens_per_s": 1e3}
    assert train_line(row, 10, "bpb", None).endswith("eta ?")


def test_threads_auto_is_at_most_two_for_a_small_model_and_the_run_says_so(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert rt.set_threads(0, 10**6) == 2  # a small model: two of the four
        torch.set_num_threads(4)
        assert rt.set_threads(0, 10**7) == 4  # a GPU-sized one: torch's default
        assert rt.set_threads(3, 10**6) == 3  # asked for: taken as is
        train_mod.train(compose(*SMALL, "train.threads=1", f"out_dir={tmp_path}"))
        assert " | threads 1 | " in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_a_gpu_sized_run_on_a_cpu_says_how_long_it_would_take(tmp_path):
    cfg = compose(*SMALL, "train.max_steps=1000", f"out_dir={tmp_path}")
    from nanoebm.data import load_data
    from nanoebm.model import EBT
    data = load_data(cfg.data)
    model = EBT(cfg.model.resolved(data.vocab_size, 16))
    state = [p.detach().clone() for p in model.parameters()]
    note = train_mod.cpu_time_note(cfg, model, data, torch.autocast("cpu", enabled=False), step=0)
    assert "1000 steps would take about " in note and note.endswith("uv run python train.py experiment=cpu")
    assert all(torch.equal(a, b) for a, b in zip(state, model.parameters()))  # no trace left
    assert all(p.grad is None for p in model.parameters())
