"""Override keys: a key that is not an option (also with Hydra's +, ++ or ~ prefix) fails in one
line naming the closest option, instead of training with the default or a screenful of Hydra.

    uv run pytest tests/test_cli.py
"""
import sys

import pytest

from lab.config import CompareConfig
from nanoebm.cli import apply_cli_shims, check_keys
from nanoebm.config import TrainRunConfig
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def fails(argv, schema=TrainRunConfig, config_dir=CONFIGS) -> str:
    """The one-line message check_keys exits with."""
    with pytest.raises(SystemExit) as e:
        check_keys(argv, schema, config_dir)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("arg,key,near", [
    ("+model.think_step=3", "model.think_step", "model.think_steps"),  # + would add a new key
    ("model.think_step=3", "model.think_step", "model.think_steps"),
    ("++model.think_step=3", "model.think_step", "model.think_steps"),
    ("~model.think_step", "model.think_step", "model.think_steps"),
    ("train.max_step=5", "train.max_step", "train.max_steps"),
    ("modle.n_layer=2", "modle.n_layer", "model.n_layer"),  # a misspelt prefix: the full name
    ("experimen=cpu", "experimen", "experiment"),           # a config group
])
def test_a_key_that_is_not_an_option_names_the_closest(arg, key, near):
    assert fails(["data.batch_size=4", arg]) == f"error: {key} is not an option; did you mean {near}?"


def test_a_key_with_nothing_close_says_where_the_options_are():
    msg = fails(["zzzz.qqq=1"])
    assert "did you mean" not in msg and "TrainRunConfig" in msg and "--cfg job" in msg


@pytest.mark.parametrize("argv", [
    ["model.think_steps=3", "+model.think_steps=3", "++train.max_steps=5", "~model.think_steps"],
    ["model=small", "experiment=cpu", "data=arith", "+experiment=cpu", "experiment=null"],
    ["hydra.run.dir=x", "hydra/job_logging=stdout", "--cfg", "job", "-m", "--config-name=train"],
    ["out_dir=a,b", "load_checkpoint=null", "data.cache_dir=~/cache"],
])
def test_options_groups_and_hydra_own_pass(argv):
    check_keys(argv, TrainRunConfig, CONFIGS)


def test_dict_and_list_fields_take_any_sub_key():
    lab = REPO / "lab" / "configs"
    check_keys(["runs.foo=[a]", "+runs.bar=[b]", "eval_variants.v.run=foo", "suite=structured",
                "scales.gpu=[]"], CompareConfig, lab)
    assert "did you mean eval_variants?" in fails(["eval_variant.v.run=foo"], CompareConfig, lab)
    assert "did you mean eval_windows?" in fails(["eval_window=8"], CompareConfig, lab)


def shims(monkeypatch, *args, **kw):
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    apply_cli_shims(schema=TrainRunConfig, **kw)
    return sys.argv[1:]


def test_the_shims_check_keys_after_rewriting_legacy_names(monkeypatch, capsys):
    assert shims(monkeypatch, "model.mcmc_num_steps=2", "--train.max_steps=5", "model=small",
                 "hydra.run.dir=x", "--cfg", "job") == \
        ["model.think_steps=2", "train.max_steps=5", "model=small", "hydra.run.dir=x", "--cfg", "job"]
    assert "legacy option model.mcmc_num_steps=2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: model.think_step is not an option; "
                                         r"did you mean model.think_steps\?$"):
        shims(monkeypatch, "+model.think_step=3")
    with pytest.raises(SystemExit, match="train.max_step is not an option; did you mean train.max_steps"):
        shims(monkeypatch, "--train.max_step=5")


def test_the_shims_leave_verbatim_keys_and_skip_the_check_without_a_schema(monkeypatch):
    shims(monkeypatch, "prompt=a,b", verbatim=("prompt",))  # not a TrainRunConfig field
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), "model.think_step=3"])
    apply_cli_shims()
