"""The baseline is the plain transformer: with think_steps=0 the model has no candidate stream
(no candidate embedding, energy head or trained alpha), starts from the same weights as the EBT
of the same seed, and checkpoints saved when baselines still carried those tensors load for
sampling (resuming their training is a one-line error naming the commit that can).

    uv run pytest tests/test_baseline.py
"""
import dataclasses
from pathlib import Path

import pytest
import torch

import train as train_mod
from nanoebm.checkpoint import (atomic_save, load_checkpoint,
                                model_from_checkpoint)
from nanoebm.model import EBT
from tests.conftest import SMALL, compose, tiny_cfg


def test_baseline_has_only_the_transformers_parameters():
    torch.manual_seed(0)
    ebt = EBT(tiny_cfg(think_steps=2))
    torch.manual_seed(0)
    base = EBT(tiny_cfg(think_steps=0))
    D, V = base.cfg.n_embd, base.cfg.vocab_size
    assert base.w_cand is None and base.energy_head is None and base.ln_e is None
    assert "alpha" not in dict(base.named_parameters()) and "alpha" not in base.state_dict()
    # the EBT's extra parameters: candidate embedding V x D, energy norm D, head D, alpha 1
    assert ebt.num_params() - base.num_params() == V * D + D + D + 1
    # one seed, the same starting weights for everything the two models share: paired runs
    e = ebt.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, e[k]), k
    assert len(base.optim_groups(0.1, 1e-3, 10.0)) == 2  # no alpha group


def test_contrastive_baseline_keeps_its_energy():
    m = EBT(tiny_cfg(think_steps=0, use_contrastive=True))
    assert m.energy_head is not None and m.has_energy


def as_old_baseline(ckpt_path: Path, out: Path) -> Path:
    """A checkpoint with the layout baselines had before: every EBT tensor (w_cand, ln_e,
    energy_head, alpha and their optimizer groups) under a think_steps=0 config. An EBT
    checkpoint with think_steps relabelled to 0 is exactly that."""
    ck = load_checkpoint(ckpt_path)
    ck["model_config"] = {**ck["model_config"], "think_steps": 0}
    atomic_save(ck, out)
    return out


def test_old_baseline_checkpoints_load_for_sampling(tmp_path):
    run = Path(train_mod.train(compose(*SMALL, "train.max_steps=2", "model.think_steps=2",
                                       f"out_dir={tmp_path / 'a'}"))["run_dir"])
    old = as_old_baseline(run / "final.pt", tmp_path / "old_baseline.pt")
    ck = load_checkpoint(old)
    assert "energy_head.weight" in ck["model"] and len(ck["optimizer"]["param_groups"]) == 3
    m = model_from_checkpoint(ck)
    assert m.energy_head is None
    for k, v in m.state_dict().items():  # the transformer's weights come through unchanged
        assert torch.equal(v, ck["model"][k]), k
    # resuming its training needs the commit that wrote that layout: a one-line error
    with pytest.raises(ValueError, match="before commit 14be9ae: resume it there"):
        train_mod.train(compose(*SMALL, "train.max_steps=3", f"load_checkpoint={old}",
                                f"out_dir={tmp_path / 'b'}"))


def test_new_baseline_checkpoint_roundtrip(tmp_path):
    s = train_mod.train(compose(*SMALL, "model.think_steps=0", f"out_dir={tmp_path}"))
    ck = load_checkpoint(Path(s["run_dir"]) / "final.pt")
    assert not any(k.startswith(("w_cand", "energy_head", "ln_e")) for k in ck["model"])
    cfg = dataclasses.replace(compose(*SMALL, "model.think_steps=0", "train.max_steps=3",
                                      f"out_dir={tmp_path / 'r'}"),
                              load_checkpoint=str(Path(s["run_dir"]) / "final.pt"))
    assert train_mod.train(cfg)["step"] == 3
