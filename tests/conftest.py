"""Shared fixtures: tiny models, Hydra compose helper, a tiny trained checkpoint.

    uv run pytest -m "not slow"           # maths, options and units: the fast tier
    uv run pytest                         # everything: + CLI, DDP, download, viz files, learning
    uv run pytest tests/test_model.py     # one file
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nanoebm.config import ModelConfig
from nanoebm.model import Context
from nanoebm.cli import register_configs, rewrite_argv

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids oversubscription
REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "configs")
# overrides that make any train.py command tiny and quick
SMALL = ["train.max_steps=2", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
         "data.block_size=16", "data.batch_size=2", "train.eval_iters=1", "train.eval_interval=1000",
         "train.log_interval=1"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def lifted_model(vocab_size: int = 11, **kw):
    """A tiny float64 EBT in training mode whose matrices are lifted off the near-zero init
    (+ 0.1 N(0, 1)), so every path carries signal; torch seed 0."""
    from nanoebm.model import EBT
    torch.manual_seed(0)
    m = EBT(tiny_cfg(vocab_size=vocab_size, **kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.1 * torch.randn_like(p))
    return m.train()


def compose(*overrides: str, config_name: str = "train"):
    """Build the typed config exactly as the CLI would (aliases and --key=value included)."""
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf
    register_configs()
    config_dir = CONFIG_DIR
    if config_name in ("sample", "viz"):  # the scripts keep their own options
        from sample import SampleConfig
        from viz import VizConfig
        register_configs({"base_sample": SampleConfig, "base_viz": VizConfig})
    if config_name in ("evaluate", "compare", "bench"):  # the lab's tools keep their own configs
        from lab.config import BenchConfig, CompareConfig, EvalConfig
        register_configs({"base_eval": EvalConfig, "base_compare": CompareConfig,
                          "base_bench": BenchConfig})
        config_dir = str(REPO / "lab" / "configs")
    args, _ = rewrite_argv(list(overrides))
    with initialize_config_dir(version_base="1.3", config_dir=config_dir):
        return OmegaConf.to_object(hcompose(config_name=config_name, overrides=args))


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    """A tiny char model trained for a few dozen steps on shakespeare.txt (shared by tests)."""
    from train import train
    out = tmp_path_factory.mktemp("trained")
    cfg = compose("model.n_layer=2", "model.n_head=2", "model.n_embd=48", "model.dropout=0.0",
                  "data.block_size=32", "data.batch_size=16", "train.max_steps=120",
                  "train.learning_rate=3e-3", "train.warmup_iters=10", "train.eval_iters=2",
                  "train.eval_interval=1000", "train.log_interval=1000", f"out_dir={out}")
    summary = train(cfg)
    return Path(summary["run_dir"]) / "final.pt"


def repeat_context(ctx: Context, n: int) -> Context:
    """Each row's cache repeated n times (rows b*n .. b*n+n-1 are copies of row b): n chains as
    n rows, the straightforward layout that
    generation's batched chains (nanoebm/generate.py) are checked against."""
    if n == 1:
        return ctx
    kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in ctx.kv]
    s1 = ctx.s1_logits[:, -1:].repeat_interleave(n, 0) if ctx.s1_logits is not None else None
    return Context(kv=kv, s1_logits=s1)
