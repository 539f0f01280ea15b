"""Options: every dataclass checks its own values when built (command line, checkpoint or code),
a preset name that does not exist is a one-line error listing the presets, and the number of
think steps at evaluation comes from one property.

    uv run pytest tests/test_config.py
"""
import os
import subprocess
import sys

import pytest

from nanoebm.checkpoint import model_config_from_dict
from nanoebm.cli import check_presets
from nanoebm.config import DataConfig, ModelConfig, TrainRunConfig
from sample import SampleConfig
from viz import VizConfig
from tests.conftest import REPO, compose


@pytest.mark.parametrize("build,msg", [
    (lambda: ModelConfig(think_init="random"), "model.think_init='random': choose one of"),
    (lambda: ModelConfig(think_grad="max"), "model.think_grad='max'"),
    (lambda: ModelConfig(n_embd=30, n_head=4), "model.n_embd=30 must be a multiple of model.n_head"),
    (lambda: ModelConfig(restart_prob=2.0), "model.restart_prob must be in [0, 1]"),
    (lambda: ModelConfig(replay_buffer_size=4, think_steps=0), "needs model.think_steps > 0"),
    (lambda: DataConfig(tokenizer="bpe"), "data.tokenizer='bpe': use char or gpt2"),
    (lambda: DataConfig(val_fraction=1.5), "data.val_fraction must be in (0, 1)"),
    (lambda: TrainRunConfig(model=ModelConfig(block_size=8)), "model.block_size=8 < data.block_size"),
    (lambda: SampleConfig(sample=True, sample_temp=0.0), "sample_temp must be > 0"),
    (lambda: VizConfig(mode="bowl"), "mode='bowl': choose one of topk, gap"),
    (lambda: VizConfig(mode="gap", steps=0), "steps=0: mode=gap needs steps >= 1"),
])
def test_bad_values_fail_where_the_config_is_built(build, msg):
    with pytest.raises(ValueError) as e:
        build()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_reaches_the_same_checks():
    with pytest.raises(ValueError, match="model.think_grad='p': choose one of"):
        compose("model.think_grad=p")
    with pytest.raises(ValueError, match="sample_top_p must be in"):
        compose("sample_top_p=0", config_name="sample")


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(SystemExit) as e:
        check_presets(["model.n_layer=2", "experiment=cpuu"], REPO / "configs")
    msg = str(e.value)
    assert msg.startswith("error: experiment=cpuu: no such preset") and "\n" not in msg
    assert all(name in msg for name in ("cpu", "ebt_s1", "ebt_s2", "fineweb_gpt2"))
    with pytest.raises(SystemExit, match="data=shakespeare: .* fineweb_edu, shakespeare_char"):
        check_presets(["data=shakespeare"], REPO / "configs")
    check_presets(["experiment=cpu", "data=fineweb_edu", "experiment=null"], REPO / "configs")


@pytest.mark.slow
def test_unknown_preset_on_the_command_line_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "experiment=cpuu",
                        f"out_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode != 0 and not list(tmp_path.iterdir())  # nothing trained
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert r.stderr.startswith("error: experiment=cpuu: no such preset") and "ebt_s2" in r.stderr


def test_eval_think_steps_is_k_plus_r():
    cfg = compose("model.think_steps=2", "model.think_steps_random=1")
    assert cfg.model.eval_think_steps == 3
    assert compose("model.think_steps=0").model.eval_think_steps == 0


def test_renamed_options_in_old_checkpoints_map_onto_current_names():
    old = {"think_steps": 3, "langevin_noise": 3.0, "no_longer_an_option": 1}
    cfg = model_config_from_dict(old)
    assert (cfg.think_steps, cfg.think_noise) == (3, 3.0)


def test_a_checkpoint_with_a_removed_option_on_fails_naming_it_and_the_commit():
    """Options taken out of the code load as before at their default value (they changed
    nothing there); any other value is a one-line error naming the option and the commit."""
    import dataclasses
    from nanoebm.checkpoint import REMOVED_OPTIONS
    from nanoebm.model import EBT
    from nanoebm.checkpoint import model_from_checkpoint
    from tests.conftest import tiny_cfg
    m = EBT(tiny_cfg())
    saved = {**dataclasses.asdict(m.cfg), **REMOVED_OPTIONS, "value_align_tau": 1.0}
    ckpt = {"model": m.state_dict(), "model_config": saved}
    assert model_from_checkpoint(ckpt).cfg == m.cfg
    for name, on in [("think_lr_per_step", True), ("crossfit_every", 10), ("think_loss", "last")]:
        with pytest.raises(ValueError, match=f"model.{name}={on}.*git checkout 14f00f5"):
            model_config_from_dict({**saved, name: on})
