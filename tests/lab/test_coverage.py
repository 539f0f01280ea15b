"""The sampler's record: replaying a checkpoint's record gives exactly the training windows the
run drew, for a fresh run and for a resumed one.

    uv run pytest tests/lab/test_coverage.py
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_mod
from nanoebm.checkpoint import load_checkpoint
from lab.coverage import replay_starts, target_coverage
from nanoebm.data import TokenData
from tests.conftest import SMALL, compose


@pytest.fixture
def seen_batches(monkeypatch):
    """Every training x the run's loop drew, recorded as it happens (the memory check's own
    measuring windows come from a generator seeded 0, not the run's: left out)."""
    seen, skip = [], set()
    orig = TokenData.get_batch
    seed0 = torch.Generator().manual_seed(0).get_state()

    def spy(self, split, batch_size, block_size, generator, *a, **kw):
        if torch.equal(generator.get_state(), seed0):  # a generator that starts at seed 0
            skip.add(id(generator))
        x, y = orig(self, split, batch_size, block_size, generator, *a, **kw)
        if split == "train" and id(generator) not in skip:
            seen.append((x.clone(), self.train, generator))
        return x, y
    monkeypatch.setattr(TokenData, "get_batch", spy)
    return seen


def assert_replay_matches(ckpt, seen):
    """The replayed starts, window for window, are the windows the loop received."""
    rec = ckpt["sampler"]
    draws = list(replay_starts(rec, ckpt["step"]))
    assert len(draws) == len(seen)
    for (starts, T), (x, train_ids, _) in zip(draws, seen):
        want = np.stack([train_ids[i:i + T] for i in starts]).astype(np.int64)
        assert np.array_equal(want, x.numpy())


def test_record_replays_the_drawn_windows(tmp_path, seen_batches):
    cfg = compose(*SMALL, "train.max_steps=20", "train.grad_accum_steps=2", f"out_dir={tmp_path}")
    run = Path(train_mod.train(cfg)["run_dir"])
    ck = load_checkpoint(run / "final.pt")
    assert len(ck["sampler"]) == 1 and ck["step"] == 20
    assert_replay_matches(ck, seen_batches)
    cov = target_coverage(ck["sampler"], ck["step"], len(seen_batches[0][1]))
    # independent count: each drawn window marks its 16 target positions
    ref = np.zeros(len(cov), dtype=np.int64)
    for (starts, T) in replay_starts(ck["sampler"], ck["step"]):
        for i in starts:
            ref[i + 1:i + 1 + T] += 1
    assert np.array_equal(cov, ref) and cov.sum() == 20 * 2 * 2 * 16


def test_resumed_run_record_covers_both_parts(tmp_path, seen_batches):
    out = tmp_path / "a"
    cfg = compose(*SMALL, "train.max_steps=10", "train.save_interval=6", f"out_dir={out}")
    run = Path(train_mod.train(cfg)["run_dir"])
    first = [s for s in seen_batches[:6]]  # the draws up to the step-6 checkpoint
    seen_batches.clear()
    cfg = compose(*SMALL, "train.max_steps=20", f"load_checkpoint={run / 'ckpt_step_000006.pt'}",
                  f"out_dir={tmp_path / 'b'}")
    run_b = Path(train_mod.train(cfg)["run_dir"])
    ck = load_checkpoint(run_b / "final.pt")
    assert [s["start_step"] for s in ck["sampler"]] == [0, 6]
    assert_replay_matches(ck, first + list(seen_batches))


def test_resume_from_a_checkpoint_without_record_has_none(tmp_path):
    import torch
    from nanoebm.checkpoint import atomic_save
    cfg = compose(*SMALL, "train.max_steps=4", f"out_dir={tmp_path / 'a'}")
    run = Path(train_mod.train(cfg)["run_dir"])
    ck = torch.load(run / "final.pt", weights_only=True)
    del ck["sampler"]  # as written before the record existed
    atomic_save(ck, tmp_path / "old.pt")
    cfg = compose(*SMALL, "train.max_steps=6", f"load_checkpoint={tmp_path / 'old.pt'}",
                  f"out_dir={tmp_path / 'b'}")
    run_b = Path(train_mod.train(cfg)["run_dir"])
    assert load_checkpoint(run_b / "final.pt")["sampler"] is None
