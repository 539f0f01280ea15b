"""Command-line shims for the entry scripts: `--key=value` (nanoGPT habit), legacy option names,
free-text values quoted for Hydra, presets checked by name, and the schemas registered with
Hydra's ConfigStore. Only entry scripts and tests import this module (it imports Hydra lazily).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from nanoebm.config import TrainRunConfig

# --------------------------------------------------------------------------------------------
# command-line shims. LEGACY_ALIASES: legacy spelling -> (canonical key, inverted?), names from
# earlier versions and from the reference code's scripts, still accepted with a one-line note.
LEGACY_ALIASES = {
    "model.mcmc_num_steps": ("model.think_steps", False),
    "model.refine_steps": ("model.think_steps", False),
    "model.mcmc_step_size": ("model.think_lr", False),
    "model.refine_step_size": ("model.think_lr", False),
    "model.mcmc_step_size_learnable": ("model.think_lr_learnable", False),
    "model.refine_step_size_learnable": ("model.think_lr_learnable", False),
    "model.mcmc_step_size_lr_multiplier": ("model.think_lr_lr_multiplier", False),
    "model.truncate_mcmc": ("model.truncate_refine", False),
    "model.no_mcmc_detach": ("model.detach_refine", True),
    "model.langevin_dynamics_noise": ("model.think_noise", False),
    "model.langevin_noise": ("model.think_noise", False),
    "model.clamp_update_max_change": ("model.think_max_move", False),
    "model.entropy_reg_tau": ("model.entropy_weight", False),
}
HYDRA_FLAGS = {"--config-path", "--config-name", "--config-dir", "--cfg", "--info", "--package",
               "--resolve", "--run", "--multirun", "--help", "--hydra-help", "--version",
               "--shell-completion", "--experimental-rerun"}
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def hydra_quote(value: str) -> str:
    """Quote a free-text value for Hydra's override grammar, which would otherwise read
    commas as sweeps, brackets as lists and ${..} as interpolations. Inside quotes only a
    quote, a ${ and backslashes right before those (or at the end) need escaping."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value  # already quoted for Hydra by the user
    esc = re.sub(r"(\\*)('|\$\{|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value)
    return f"'{esc}'"


def rewrite_argv(argv: list[str], verbatim: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Accept `--key=value` (nanoGPT habit) and legacy option names; keys in `verbatim` (free
    text such as a prompt) are passed to Hydra as literal strings. Returns (argv, notes)."""
    out, notes = [], []
    for arg in argv:
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] not in HYDRA_FLAGS:
            arg = arg[2:]  # Hydra reserves --flags for itself; ours are plain key=value
        key, eq, value = arg.partition("=")
        if eq and key in LEGACY_ALIASES:
            new_key, inverted = LEGACY_ALIASES[key]
            if inverted:
                b = _BOOLS.get(value.strip().lower())
                if b is None:
                    raise SystemExit(f"error: {key} expects true/false, got {value!r}")
                value = str(not b).lower()
            notes.append(f"note: legacy option {key}={arg.partition('=')[2]} -> {new_key}={value}")
            arg = f"{new_key}={value}"
        elif eq and key in verbatim:
            arg = f"{key}={hydra_quote(value)}"
        elif eq and value.startswith("~"):  # Hydra's grammar rejects a bare ~ (data.py expands it)
            arg = f"{key}={hydra_quote(value)}"
        out.append(arg)
    return out, notes


def check_presets(argv: list[str], config_dir: Path) -> None:
    """`experiment=NAME` (any config group: experiment, data, suite) must name a file in
    configs/<group>/: a one-line error listing the presets, instead of Hydra's screenful."""
    for group, eq, name in (arg.partition("=") for arg in argv):
        folder = config_dir / group.lstrip("+")
        if eq and "." not in group and folder.is_dir() and name != "null" \
                and not (folder / f"{name}.yaml").is_file():
            names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise SystemExit(f"error: {group}={name}: no such preset in configs/{folder.name}/; "
                             f"choose one of {names}")


def apply_cli_shims(verbatim: tuple[str, ...] = ()) -> None:
    """Rewrite sys.argv in place before @hydra.main parses it, printing one note per alias,
    and check preset names against the configs/ folder next to the script."""
    sys.argv[1:], notes = rewrite_argv(sys.argv[1:], verbatim)
    check_presets(sys.argv[1:], Path(sys.argv[0]).resolve().parent / "configs")
    for n in notes:
        print(n)


def register_configs(nodes: dict | None = None) -> None:
    """Register schemas with Hydra's ConfigStore (only entry scripts and tests call this): the
    training run's by default; sample.py, viz.py and the lab's tools pass {name: their dataclass}."""
    from hydra.core.config_store import ConfigStore
    for name, node in (nodes or {"base_train": TrainRunConfig}).items():
        ConfigStore.instance().store(name=name, node=node)
