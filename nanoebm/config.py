"""Typed config schema for every entry script, plus the command-line shims.

The dataclasses are the single source of truth for option names and defaults; YAML files in
configs/ only hold presets. Hydra is imported lazily (in register_configs) so the library itself
never needs it: code receives plain dataclass instances.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class ModelConfig:
    # backbone sizes (vocab_size / block_size = 0: taken from the data)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 0          # longest context the model supports; 0 = data.block_size
    vocab_size: int = 0          # 0 = the data's vocabulary; a different value is an error
    dropout: float = 0.1
    tie_candidate_embedding: bool = False  # candidate embedding p @ W: W = input embedding
    step_embed: bool = False     # learned per-think-step embedding added to the candidate stream
    # thinking (SPEC §3)
    think_steps: int = 2
    think_init: str = "s1"       # s1 | noise | zeros
    think_init_std: float = 1.0
    think_grad: str = "hybrid"   # probs (reference) | logits (paper) | hybrid: dJ/dp applied to z
    think_lr: float = 1.0        # alpha
    think_lr_learnable: bool = True
    think_lr_lr_multiplier: float = 10.0
    think_lr_random_scale: float = 2.0   # s: alpha per token ~ U[alpha/s, alpha*s] when training
    think_steps_random: int = 0  # r: train on K..K+r steps, evaluate on K+r
    think_max_move: float = 0.0  # clamp |alpha*g| per logit (0 = off)
    detach_refine: bool = True
    truncate_refine: bool = False
    langevin_noise: float = 0.5  # std of noise added to z before each step (training)
    softmax_temperature: float = 1.0
    entropy_weight: float = 0.0
    mixture_stopgrad: bool = False
    aux_ce_weight: float = 1.0   # weight of CE on the System-1 logits
    # recipe knobs: what decides whether steps 2+ pay (see README "Does thinking help?")
    think_loss: str = "mean"     # CE over steps: mean | last | linear (weight k+1 on step k+1)
    think_improve_weight: float = 0.0  # + w * mean_t relu(CE_{k+1,t} - CE_{k,t}): no step may hurt
    think_normalize_grad: bool = False  # g <- g / rms_V(g) per position: alpha = RMS logit move
    think_lr_per_step: bool = False     # one alpha per think step (steps past K reuse the last)
    think_prox_weight: float = 1.0      # + prox * (z - z_0) per step: converge, don't drift
    # contrastive energy shaping (SPEC §4)
    use_contrastive: bool = False
    contrastive_type: str = "cd"  # cd | pcd | fast_pcd (where the negative chains start)
    contrastive_weight: float = 0.1
    contrastive_k: int = 1       # Langevin steps per negative sample and training step
    contrastive_reg: float = 0.1  # reg*(E_pos^2 + E_neg^2): energies settle near -+1/(2 reg)
    langevin_step_size: float = 0.01   # z <- z - step * dE/dz + noise_scale * N(0, I)
    langevin_noise_scale: float = 0.005
    n_persistent: int = 100      # pcd: records (window + logits); min(B, n) continued per step
    n_chains: int = 20           # fast_pcd: chains, all continued every step
    restart_prob: float = 0.05   # per selected chain and step: new window, z ~ N(0, init_std^2)
    buffer_init_std: float = 1.0
    fast_lr: float = 0.01        # fast_pcd: fast <- fast_decay * fast - fast_lr * grad_neg
    fast_decay: float = 0.95
    replay_buffer_size: int = 0  # records of (window, final logits); 0 = off (reference S2: 192)
    replay_fraction: float = 0.5  # extra rows per batch, as a fraction of the batch size


@dataclass
class DataConfig:
    data_path: str = "shakespeare.txt"
    tokenizer: str = "char"      # char | gpt2 (any tiktoken encoding via bpe_encoding)
    bpe_encoding: str = "gpt2"
    max_shards: Optional[int] = None
    val_fraction: Optional[float] = None  # None: 0.1 for a text file, last shard for parquet
    cache_dir: Optional[str] = None
    block_size: int = 256
    batch_size: int = 64


@dataclass
class TrainConfig:
    max_steps: int = 5000
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 200
    lr_decay_iters: int = 0      # 0 = max_steps
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    auto_accum: bool = False     # batch too big for the memory: train it as micro-batches
    log_interval: int = 10
    eval_interval: int = 500
    eval_iters: int = 50
    save_interval: int = 1000
    seed: int = 1337
    device: str = "auto"         # auto (cuda > mps > cpu) | cuda | mps | cpu
    dtype: str = "auto"          # auto (bf16 autocast on CUDA, else float32) | float32 | bfloat16
    compile: bool = False


@dataclass
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "out_ebt"
    load_checkpoint: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None


@dataclass
class SampleConfig:
    checkpoint: Optional[str] = None     # None = the newest finished run under out_dir
    out_dir: str = "out_ebt"
    prompt: str = "\n"
    strict_prompt: bool = True           # false: drop characters the char vocabulary lacks
    max_new_tokens: int = 200
    num_samples: int = 1
    # thinking (SPEC §3); None = what the checkpoint was trained with
    use_thinking: bool = True            # false: System-1 logits (no S1 head: the z_0 candidate)
    think_steps: Optional[int] = None    # None = model.think_steps + model.think_steps_random
    think_lr: Optional[float] = None     # None = the trained alpha
    think_noise: float = 0.0             # Langevin noise std added before each think step
    accept_lower_energy: bool = False    # keep a think step only where it lowers the energy
    n_candidates: int = 1                # best-of-N: N chains per token, lowest final energy wins
    # decoding
    sample: bool = False                 # false = argmax (greedy, deterministic)
    sample_temp: float = 1.0
    topk: Optional[int] = None           # keep the k most likely tokens (None/0 = all)
    sample_top_p: Optional[float] = None  # nucleus: smallest set with mass >= p (None = all)
    seed: int = 1337
    kv_cache: bool = True
    device: str = "auto"
    stream: bool = True                  # print tokens as they are generated
    tokenizer: Optional[str] = None      # None = from the checkpoint; char | gpt2 | tiktoken name
    bpe_encoding: Optional[str] = None   # tiktoken encoding for tokenizer=gpt2 (default gpt2)


@dataclass
class CompareConfig:
    suite: str = "recipes"       # name of the results files (configs/suite/<suite>.yaml sets it)
    scale: str = "cpu"           # a key of `scales`: the model size and step budget of every run
    scales: Dict[str, List[str]] = field(default_factory=dict)  # scale -> train.py overrides
    base: List[str] = field(default_factory=list)   # train.py overrides shared by every run
    runs: Dict[str, List[str]] = field(default_factory=dict)  # run name -> its overrides
    only: List[str] = field(default_factory=list)   # run just these names (empty = all)
    seeds: List[int] = field(default_factory=lambda: [1337])
    eval_steps: List[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    eval_iters: int = 50         # fixed val batches, identical for every run
    eval_seed: int = 2024
    n_candidates: int = 4        # best-of-N at the trained step count (1 = off)
    bon_noise: float = 0.5       # Langevin noise that makes the N chains differ
    jobs: int = 1                # runs trained in parallel (processes)
    threads: int = 1             # torch threads per run
    out_dir: str = "results"


@dataclass
class VizConfig:
    """viz.py: pictures computed from a checkpoint's real energies (see viz.py for the modes)."""
    checkpoint: Optional[str] = None  # None: the newest out_ebt/run_*/final.pt
    mode: str = "topk"           # topk | gap | gap_multi | bowl_panels | bowl_anim | traj |
    #                              surface3d | surface_anim | margin | eval | per_token
    prompt: str = "ROMEO:"
    steps: int = 8               # think steps to trace (K)
    topk: int = 20               # topk: bars for the lowest-energy next tokens
    topk_think: int = 10         # traj: tokens whose trajectories are drawn
    traj_space: str = "logits"   # traj: logits (centred) | probs
    multi_trajectories: int = 5  # gap_multi: noisy chains overlaid
    think_noise: float = 0.3     # gap_multi: Langevin noise std added to z before each step
    tokens: int = 3              # per_token: generated tokens to trace
    per_token_anim: bool = False  # per_token: one animation per token instead of panels
    grid: int = 41               # points per axis of bowl profiles / surface slices (made odd)
    span: float = 4.0            # half-width of bowl profiles / surface padding, logit units
    split: str = "val"           # batch modes (gap, margin, eval): train | val
    batch_size: int = 16
    eval_iters: int = 4          # eval: fixed batches in the thinking curve
    data_path: Optional[str] = None  # batch modes: None = the checkpoint's data.data_path
    out_dir: str = "out_ebt/viz"
    writer: str = "auto"         # animations: auto (mp4 if ffmpeg exists, else gif) | gif | mp4
    seed: int = 1337
    dpi: int = 100
    device: str = "auto"         # auto (cuda > mps > cpu) | cuda | mps | cpu


@dataclass
class BenchConfig:
    """bench.py: EBT vs baseline training step, memory, MFU and generation speed, one run."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    data: DataConfig = field(default_factory=lambda: DataConfig(block_size=64, batch_size=12))
    quick: bool = False          # ~1 minute: fewer timed steps and generated tokens
    warmup: int = 3              # untimed steps per variant
    iters: int = 20              # timed steps per variant (medians reported)
    gen_block_size: int = 256    # generation: context window (prompt + new tokens fill it)
    gen_think_steps: int = 4
    gen_tokens: int = 128        # new tokens per generation timing
    device: str = "auto"
    dtype: str = "auto"          # auto: bf16 autocast on CUDA, float32 elsewhere
    compile: bool = False        # torch.compile the context stream (as train.compile)
    threads: int = 0             # torch CPU threads (0 = torch's default)
    out: str = "bench.json"
    seed: int = 1337


# --------------------------------------------------------------------------------------------
# command-line shims

# legacy spelling -> (canonical key, inverted?)  Earlier repos in this lineage used these names.
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
    "model.langevin_dynamics_noise": ("model.langevin_noise", False),
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


def apply_cli_shims(verbatim: tuple[str, ...] = ()) -> None:
    """Rewrite sys.argv in place before @hydra.main parses it, printing one note per alias."""
    sys.argv[1:], notes = rewrite_argv(sys.argv[1:], verbatim)
    for n in notes:
        print(n)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (only entry scripts and tests call this)."""
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainRunConfig)
    cs.store(name="base_compare", node=CompareConfig)
    cs.store(name="base_sample", node=SampleConfig)
    cs.store(name="base_viz", node=VizConfig)
    cs.store(name="base_bench", node=BenchConfig)
