"""Typed config schema of a training run: the model, the data, the loop (train.py). sample.py and
viz.py keep their own options at their top, the lab's tools in lab/config.py; the command-line
shims live in nanoebm/cli.py.

The dataclasses are the single source of truth for option names, defaults and valid values:
each checks its own options in __post_init__, so a bad value fails with one line naming the fix
wherever the config is built. YAML files in configs/ only hold presets. This module never
imports Hydra: code receives plain dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


def check_rules(rules: list[tuple[bool, str]]) -> None:
    """Raise the message of the first (ok, message) rule that fails, as a ValueError."""
    for ok, msg in rules:
        if not ok:
            raise ValueError(msg)


def choice_rules(cfg, prefix: str, allowed: dict) -> list[tuple[bool, str]]:
    """Rules for check_rules: each named option holds one of its allowed values."""
    return [(getattr(cfg, n) in ok, f"{prefix}{n}={getattr(cfg, n)!r}: choose one of {', '.join(ok)}")
            for n, ok in allowed.items()]


@dataclass
class ModelConfig:
    # -- architecture: one stack of Llama-style blocks run as two streams (nanoebm/model.py)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 0          # longest context the model supports; 0 = data.block_size
    vocab_size: int = 0          # 0 = the data's vocabulary; a different value is an error
    dropout: float = 0.1
    step_embed: bool = False     # learned per-think-step embedding added to the candidate stream
    step_adaln: bool = False     # AdaLN: per-think-step scale/shift after the candidate stream's norms
    think_neutral: bool = False  # think steps lose their part along z - mean_V(z): no pure sharpening

    # -- thinking: z <- z - alpha * dJ/d(.) for think_steps steps (nanoebm/think.py)
    think_steps: int = 2         # K; 0 = the plain transformer baseline (no energy at all)
    think_init: str = "s1"       # z_0: s1 (System-1 logits) | noise | zeros
    think_init_std: float = 1.0  # std of the noise start
    think_grad: str = "hybrid"   # probs (reference) | logits (paper) | hybrid: dJ/dp applied to z
    think_lr: float = 1.0        # alpha, the step size
    think_lr_learnable: bool = True      # alpha is a parameter (its own AdamW group)
    think_lr_lr_multiplier: float = 10.0  # alpha's learning rate = train.learning_rate x this
    think_lr_random_scale: float = 2.0   # s: alpha per token ~ U[alpha/s, alpha*s] when training
    think_steps_random: int = 0  # r: train on K..K+r steps (drawn per batch), evaluate on K+r
    think_noise: float = 0.5     # std of the noise added to z before each training step
    think_max_move: float = 0.0  # clamp |alpha * g| per logit (0 = off)
    think_prox_weight: float = 1.0      # + prox * (z - z_0) per step: converge, don't drift
    softmax_temperature: float = 1.0     # p = softmax(z / tau)
    entropy_weight: float = 0.0  # J = sum E - lambda * sum H(p)
    mixture_stopgrad: bool = False       # the candidate embedding learns from E's value only

    # -- training the think path: which CEs the loss adds up (nanoebm/losses.py)
    detach_refine: bool = True   # detach z between steps (each step trained from its own start)
    truncate_refine: bool = False  # the loss (and graph) on the last step only
    aux_ce_weight: float = 1.0   # weight of the CE on the System-1 logits

    # -- energy shaping and replay, training only (nanoebm/shaping.py)
    use_contrastive: bool = False  # + contrastive_weight * L_cd
    contrastive_type: str = "cd"  # where negative chains start: cd | pcd | fast_pcd
    contrastive_weight: float = 0.1
    contrastive_k: int = 1       # Langevin steps per negative sample and training step
    contrastive_reg: float = 0.1  # reg*(E_pos^2 + E_neg^2): energies settle near -+1/(2 reg)
    langevin_step_size: float = 0.01   # negatives: z <- z - step * dE/dz + noise_scale * N(0, I)
    langevin_noise_scale: float = 0.005
    n_persistent: int = 100      # pcd: records (window + logits); min(B, n) continued per step
    n_chains: int = 20           # fast_pcd: chains, all continued every step
    restart_prob: float = 0.05   # per selected chain and step: new window, z ~ N(0, init_std^2)
    buffer_init_std: float = 1.0  # std of a new chain's logits
    fast_lr: float = 0.01        # fast_pcd: fast <- fast_decay * fast - fast_lr * grad_neg
    fast_decay: float = 0.95
    replay_buffer_size: int = 0  # records of (window, final logits); 0 = off (reference S2: 192)
    replay_fraction: float = 0.5  # extra rows per batch, as a fraction of the batch size

    def __post_init__(self):
        """Every model option is checked here, once: a bad value fails when the config is built
        (on the command line, from a checkpoint, or in code), with a line naming the fix."""
        check_rules(choice_rules(self, "model.", {"think_init": ("s1", "noise", "zeros"),
                                         "think_grad": ("probs", "logits", "hybrid"),
                                         "contrastive_type": ("cd", "pcd", "fast_pcd")}) + [
            (self.n_head > 0 and self.n_embd % self.n_head == 0 and self.n_embd // self.n_head % 2 == 0,
             f"model.n_embd={self.n_embd} must be a multiple of model.n_head={self.n_head} with an "
             "even head size (RoPE rotates pairs)"),
            (self.think_steps >= 0 and self.think_steps_random >= 0,
             "model.think_steps and model.think_steps_random must be >= 0"),
            (self.contrastive_k >= 0, "model.contrastive_k must be >= 0"),
            (self.contrastive_reg >= 0, "model.contrastive_reg must be >= 0"),
            (self.langevin_step_size >= 0 and self.langevin_noise_scale >= 0,
             "model.langevin_step_size and model.langevin_noise_scale must be >= 0"),
            (0 <= self.restart_prob <= 1, "model.restart_prob must be in [0, 1]"),
            (self.n_persistent >= 1 and self.n_chains >= 1,
             "model.n_persistent and model.n_chains must be >= 1"),
            (0 <= self.fast_decay <= 1, "model.fast_decay must be in [0, 1]"),
            (self.replay_buffer_size >= 0, "model.replay_buffer_size must be >= 0"),
            (0 < self.replay_fraction <= 1, "model.replay_fraction must be in (0, 1]"),
            (self.replay_buffer_size == 0 or self.think_steps > 0,
             "model.replay_buffer_size needs model.think_steps > 0 (replay restarts thinking)"),
        ])

    @property
    def eval_think_steps(self) -> int:
        """Think steps at evaluation and generation: K + r (training draws K..K+r per batch)."""
        return self.think_steps + self.think_steps_random

    @property
    def has_energy(self) -> bool:
        """Whether the model has a candidate stream and energy head at all: the baseline
        (think_steps=0, no contrastive term) is the plain transformer."""
        return self.eval_think_steps > 0 or self.use_contrastive

    def resolved(self, vocab_size: int, block_size: int) -> "ModelConfig":
        """This config with the data-dependent sizes filled in (0 = take them from the data)."""
        if self.vocab_size not in (0, vocab_size):
            raise ValueError(f"model.vocab_size={self.vocab_size} but the data has {vocab_size} "
                             "tokens: drop the override (0 = take it from the data)")
        return replace(self, vocab_size=vocab_size, block_size=self.block_size or block_size)


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

    def __post_init__(self):
        check_rules([(self.tokenizer in ("char", "gpt2"),
                 f"data.tokenizer={self.tokenizer!r}: use char or gpt2 (BPE; pick the tiktoken "
                 "vocabulary with data.bpe_encoding)"),
                (self.val_fraction is None or 0 < self.val_fraction < 1,
                 f"data.val_fraction must be in (0, 1), got {self.val_fraction}"),
                (self.max_shards is None or self.max_shards >= 1,
                 f"data.max_shards={self.max_shards}: use a positive count or null")])


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
    think_neutral: bool = True   # the val curve's steps: sharpening-neutral, as at inference
    threads: int = 0             # torch CPU threads; 0 = auto (nanoebm/runtime.py: set_threads)


@dataclass
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "out_ebt"
    load_checkpoint: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None

    def __post_init__(self):
        check_rules([(not self.model.block_size or self.model.block_size >= self.data.block_size,
                 f"model.block_size={self.model.block_size} < data.block_size="
                 f"{self.data.block_size}: raise it or leave it at 0")])
