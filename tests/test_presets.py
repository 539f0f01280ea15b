"""Size presets (configs/model/: model=small | medium | large | xl) and the fineweb_gpt2 preset:
sizes and learning rates as the reference sets them, typos fail, and `experiment=fineweb_gpt2
model=small` trains on a CPU at a tiny batch (a small local BPE and parquet shards).

    uv run pytest tests/test_presets.py
"""
import math

import pytest
from hydra.errors import MissingConfigException

from tests.conftest import compose
from tests.test_data_bpe import TEXT, train_ranks, write_ranks, write_shards

SIZES = {"small": (12, 12, 768, 6e-4), "medium": (24, 16, 1024, 3e-4),
         "large": (24, 16, 1536, 2.5e-4), "xl": (24, 32, 2048, 2e-4)}


@pytest.mark.parametrize("name", SIZES)
def test_size_preset_sets_sizes_and_learning_rate(name):
    cfg = compose(f"model={name}")
    m, tc = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, tc.learning_rate) == SIZES[name]
    assert math.isclose(tc.min_lr, tc.learning_rate / 10)
    assert tc.auto_accum and m.think_steps == 2 and cfg.data.tokenizer == "char"  # sizes only


def test_size_presets_combine_with_experiments_and_overrides():
    cfg = compose("experiment=fineweb_gpt2", "model=small")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.data.tokenizer) == (12, 768, "gpt2")
    assert (cfg.data.batch_size, cfg.train.grad_accum_steps) == (32, 2)
    cpu = compose("experiment=cpu", "model=small")  # the size preset wins over an experiment's
    assert (cpu.model.n_layer, cpu.data.block_size) == (12, 64)
    assert compose("model=small", "model.n_layer=3").model.n_layer == 3
    with pytest.raises(MissingConfigException, match="model/smal"):
        compose("model=smal")


@pytest.mark.slow  # ~20-30 s: two steps of a 201M-parameter model on one CPU thread
def test_fineweb_small_trains_on_cpu(tmp_path):
    from train import train
    rank_file = write_ranks(tmp_path / "tiny.tiktoken", train_ranks(TEXT[:4000], 10))
    write_shards(tmp_path / "fw", 2, docs=8, lines=6)  # the last shard is the val split
    summary = train(compose("experiment=fineweb_gpt2", "model=small",
                            f"data.data_path={tmp_path / 'fw'}", f"data.bpe_encoding={rank_file}",
                            "data.block_size=8", "data.batch_size=1", "train.grad_accum_steps=1",
                            "train.max_steps=2",
                            "train.eval_iters=1", "train.log_interval=1", "train.device=cpu",
                            f"out_dir={tmp_path / 'out'}"))
    assert summary["step"] == 2 and math.isfinite(summary["val_bpt"])
