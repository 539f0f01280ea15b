"""The memory check before the first step (nanoebm/memory.py): the saved-bytes meter is linear in
the batch, a batch that cannot fit is refused with a split that does, train.auto_accum trains
that split to the same weights as the unsplit batch, and the check leaves training untouched.
Accumulated micro-batches (the fineweb_gpt2 preset's path) equal the full batch at V >= 1000.

    uv run pytest tests/test_memory.py
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import nanoebm.memory as M
import train as train_mod
from nanoebm import runtime as rt
from nanoebm.checkpoint import load_checkpoint
from nanoebm.config import ModelConfig
from nanoebm.data import load_data
from nanoebm.losses import forward_backward
from nanoebm.model import EBT
from tests.conftest import SMALL, compose

QUIET = ["model.think_noise=0.0", "model.think_lr_random_scale=1.0", "model.dropout=0.0"]


def bpe_model(V=1024, T=16, **kw):
    """Defaults of the recipe (K=2, S1 start, hybrid grad) at a tiny size and a BPE-sized V."""
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=V, block_size=T, dropout=0.0)
    return EBT(ModelConfig(**{**base, **kw})).train()


def windows(V, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def test_meter_linear_in_batch_on_bpe_model():
    model, V, T = bpe_model(), 1024, 16
    sizes, peaks = [1, 2, 4], []
    for B in sizes:
        meter = M.SavedBytes(model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            forward_backward(model, *windows(V, B, T), scale=1.0)
        model.zero_grad(set_to_none=True)
        peaks.append(meter.peak)
    n = np.array(sizes, float) * T  # B*T tokens
    slope, icept = np.polyfit(n, peaks, 1)
    resid = np.array(peaks) - (slope * n + icept)
    r2 = 1 - (resid ** 2).sum() / ((np.array(peaks) - np.mean(peaks)) ** 2).sum()
    assert r2 > 0.99, (peaks, r2)
    assert slope > 3 * V * 4  # per token: several fp32 (V,) candidate rows are held
    assert abs(icept) < 0.1 * peaks[0]  # no activation without a batch dimension


def tiny_run(tmp_path, name, *extra, free=None, monkeypatch=None):
    if free is not None:
        monkeypatch.setattr(M, "free_bytes", lambda device: free)
    cfg = compose(*SMALL, "data.batch_size=4", *extra, f"out_dir={tmp_path / name}")
    return cfg, train_mod.train(cfg)


def estimate_for(cfg):
    data = load_data(cfg.data)
    model = EBT(cfg.model.resolved(data.vocab_size, cfg.data.block_size))
    row, fixed = M.step_estimate(model, data, cfg.data.block_size, "cpu", rt.autocast_for("cpu")[0])
    weights = sum(p.numel() * 4 for p in model.parameters())
    return row, fixed, weights


def free_for(cfg, windows_fit: float) -> int:
    """A free-memory figure with room for `windows_fit` windows per micro-batch."""
    row, fixed, weights = estimate_for(cfg)
    return int((fixed + windows_fit * row) / M.HEADROOM - weights)


def test_refuses_batch_that_cannot_fit_with_a_split(tmp_path, monkeypatch):
    cfg = compose(*SMALL, "data.batch_size=4")
    monkeypatch.setattr(M, "free_bytes", lambda device: free_for(cfg, 2.5))
    with pytest.raises(ValueError) as e:
        train_mod.train(compose(*SMALL, "data.batch_size=4", f"out_dir={tmp_path}"))
    msg = str(e.value)
    assert "\n" not in msg and "needs about" in msg and "free" in msg
    assert "data.batch_size=2 train.grad_accum_steps=2" in msg and "train.auto_accum=true" in msg
    assert not list(tmp_path.glob("run_*"))  # refused before anything was written
    monkeypatch.setattr(M, "free_bytes", lambda device: free_for(cfg, 0.5))  # not one window
    with pytest.raises(ValueError, match="too little for even one window"):
        train_mod.train(compose(*SMALL, "data.batch_size=4", f"out_dir={tmp_path}"))


def test_auto_accum_trains_the_split_to_the_same_weights(tmp_path, monkeypatch):
    _, full = tiny_run(tmp_path, "full", *QUIET)
    cfg = compose(*SMALL, "data.batch_size=4")
    _, split = tiny_run(tmp_path, "split", *QUIET, "train.auto_accum=true",
                        free=free_for(cfg, 2.5), monkeypatch=monkeypatch)
    ck_full = load_checkpoint(Path(full["run_dir"]) / "final.pt")
    ck_split = load_checkpoint(Path(split["run_dir"]) / "final.pt")
    assert (ck_full["config"]["data"]["batch_size"], ck_full["config"]["train"]["grad_accum_steps"]) == (4, 1)
    assert (ck_split["config"]["data"]["batch_size"], ck_split["config"]["train"]["grad_accum_steps"]) == (2, 2)
    for k, v in ck_full["model"].items():  # same windows, same maths: same weights
        torch.testing.assert_close(ck_split["model"][k], v, rtol=1e-4, atol=1e-6)


def test_check_leaves_training_unchanged(tmp_path, monkeypatch):
    _, on = tiny_run(tmp_path, "on")  # default recipe: noise, dropout, random alpha all drawn
    monkeypatch.setattr(train_mod, "fit_batch", lambda cfg, *a, **k: cfg)
    _, off = tiny_run(tmp_path, "off")
    a = load_checkpoint(Path(on["run_dir"]) / "final.pt")
    b = load_checkpoint(Path(off["run_dir"]) / "final.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_accumulated_micro_batches_equal_the_full_batch_at_bpe_vocab():
    V, T = 1024, 16
    x, y = windows(V, 4, T, seed=3)
    grads = []
    for parts in (1, 2):
        model = bpe_model(V, T, think_noise=0.0, think_lr_random_scale=1.0)
        losses = [forward_backward(model, xs, ys, scale=1.0 / parts)[0]
                  for xs, ys in zip(x.chunk(parts), y.chunk(parts))]
        grads.append((sum(losses) / parts, {n: p.grad for n, p in model.named_parameters()
                                            if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g2) and "alpha" in g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-7, msg=n)


def test_free_memory_and_split_helpers():
    free = M.free_bytes("cpu")
    assert free is not None and 0 < free < 1 << 50
    assert M.largest_fit(64, per_row=1.0, fixed=10.0, room=45.0) == 32  # divisors of 64 only
    assert M.largest_fit(12, per_row=1.0, fixed=0.0, room=5.0) == 4
    assert M.largest_fit(8, per_row=1.0, fixed=10.0, room=10.5) == 0
    # the default (GPU-sized) model is not a small one (train.py times it on a CPU and points at
    # the CPU preset, tests/test_new_user.py); the CPU preset is (one thread by default)
    assert EBT(ModelConfig(vocab_size=65, block_size=256)).num_params() > rt.SMALL_MODEL
    assert EBT(ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=65,
                           block_size=64)).num_params() < rt.SMALL_MODEL
