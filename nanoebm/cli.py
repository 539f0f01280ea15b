"""Command-line shims for the entry scripts: `--key=value` (nanoGPT habit), legacy option names,
free-text values quoted for Hydra, presets checked by name, and the schemas registered with
Hydra's ConfigStore. Only entry scripts and tests import this module (it imports Hydra lazily).
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

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


def option_names(schema: type, prefix: str = "") -> dict[str, bool]:
    """Dotted field names of a (nested) dataclass schema -> whether a dict/list takes sub-keys."""
    out = {}
    for n, t in get_type_hints(schema).items():
        if hasattr(t, "__dataclass_fields__"):
            out |= option_names(t, f"{prefix}{n}.")
        out[prefix + n] = any((get_origin(a) or a) in (dict, list, Any) for a in (t, *get_args(t)))
    return out


def check_keys(argv: list[str], schema: type, config_dir: Path) -> None:
    """Every override (key=, +key=, ++key=, ~key) names a field of `schema`, a config group or
    hydra.*: Hydra would add +model.think_step=3 as a key nothing reads, silently."""
    fields = option_names(schema)
    names = set(fields) | {p.parent.name for p in config_dir.glob("*/*.yaml")}  # model=small
    free = tuple(f"{n}." for n, any_key in fields.items() if any_key) + ("hydra.", "hydra/")
    keys = [a.partition("=")[0].lstrip("+~").split("@")[0] for a in argv
            if "=" in a and not a.startswith("-") or a.startswith("~")]  # --flags are Hydra's
    for key in (k for k in keys if k not in names and not k.startswith(free)):
        prefix, _, last = key.rpartition(".")  # a near miss within the same prefix comes first
        siblings = {n.rpartition(".")[2]: n for n in names if n.rpartition(".")[0] == prefix}
        near = [siblings[m] for m in difflib.get_close_matches(last, siblings, 1, 0.6)] \
            or difflib.get_close_matches(key, sorted(names), 1, 0.6)
        raise SystemExit(f"error: {key} is not an option; " + (f"did you mean {near[0]}?" if near
                         else f"the options are the fields of {schema.__name__} (see --cfg job)"))


def apply_cli_shims(verbatim: tuple[str, ...] = (), schema: type | None = None) -> None:
    """Rewrite sys.argv in place before @hydra.main parses it, printing one note per alias, and
    check preset names (configs/ next to the script) and, given a schema, every override's key."""
    sys.argv[1:], notes = rewrite_argv(sys.argv[1:], verbatim)
    configs = Path(sys.argv[0]).resolve().parent / "configs"
    check_presets(sys.argv[1:], configs)
    if schema is not None:  # after the rewriting: legacy names pass; free text is not a key
        check_keys([a for a in sys.argv[1:] if a.split("=")[0] not in verbatim], schema, configs)
    for n in notes:
        print(n)


def register_configs(nodes: dict | None = None) -> None:
    """Register schemas with Hydra's ConfigStore (only entry scripts and tests call this): the
    training run's by default; sample.py, viz.py and the lab's tools pass {name: their dataclass}."""
    from hydra.core.config_store import ConfigStore
    for name, node in (nodes or {"base_train": TrainRunConfig}).items():
        ConfigStore.instance().store(name=name, node=node)
