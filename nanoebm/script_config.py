"""Typed configs of the entry scripts besides train.py: sample.py, compare.py, evaluate.py,
viz.py and bench.py. Like nanoebm/config.py (the training run), each dataclass checks its own
options in __post_init__, and this module never imports Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nanoebm.config import DataConfig, ModelConfig, check_rules, choice_rules


@dataclass
class SampleConfig:
    checkpoint: Optional[str] = None     # None = the newest finished run under out_dir
    out_dir: str = "out_ebt"
    prompt: str = "\n"
    strict_prompt: bool = True           # false: drop characters the char vocabulary lacks
    max_new_tokens: int = 200
    num_samples: int = 1
    # -- thinking; None = what the checkpoint was trained with
    use_thinking: bool = True            # false: System-1 logits (no S1 head: the z_0 candidate)
    think_steps: Optional[int] = None    # None = the model's eval_think_steps (K + r)
    think_lr: Optional[float] = None     # None = the trained alpha
    think_noise: float = 0.0             # std of the noise added to z before each think step
    accept_lower_energy: bool = False    # keep a think step only where it lowers the energy
    n_candidates: int = 1                # best-of-N: N chains per token, lowest final energy wins
    think_neutral: Optional[bool] = None  # sharpening-neutral steps (None = the checkpoint's setting)
    # -- decoding
    sample: bool = False                 # false = argmax (greedy, deterministic)
    sample_temp: float = 1.0
    topk: Optional[int] = None           # keep the k most likely tokens (None/0 = all)
    sample_top_p: Optional[float] = None  # nucleus: smallest set with mass >= p (None = all)
    seed: int = 1337
    kv_cache: bool = True
    compile: bool = False                # torch.compile the think step (first token compiles)
    device: str = "auto"
    stream: bool = True                  # print tokens as they come (one sample; a batch prints at the end)
    tokenizer: Optional[str] = None      # None = from the checkpoint; char | gpt2 | tiktoken name
    bpe_encoding: Optional[str] = None   # tiktoken encoding for tokenizer=gpt2 (default gpt2)

    def __post_init__(self):
        check_rules([(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                (self.num_samples >= 1, "num_samples must be >= 1"),
                (self.n_candidates >= 1, "n_candidates must be >= 1"),
                (self.think_steps is None or self.think_steps >= 0, "think_steps must be >= 0"),
                (self.think_lr is None or self.think_lr > 0, "think_lr must be > 0"),
                (self.think_noise >= 0, "think_noise must be >= 0"),
                (self.topk is None or self.topk >= 0, "topk must be >= 0 (0 = off)"),
                (self.sample_top_p is None or 0 < self.sample_top_p <= 1,
                 "sample_top_p must be in (0, 1]"),
                (not self.sample or self.sample_temp > 0,
                 "sample_temp must be > 0 (for argmax use sample=false)")])


@dataclass
class CompareConfig:
    suite: str = "compare"       # name of the results files (configs/suite/<suite>.yaml sets it)
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
    think_noise: float = 0.5     # best-of-N: the noise (before each step) that makes chains differ
    # evaluate.py on every thinking run (nanoebm/scorecard.py), the suite's plain transformer
    # of the same seed as the shift axis: results/<eval_name>.{json,md,png}
    eval_sets: List[str] = field(default_factory=list)  # e.g. [val, corrupt_05]; empty = off
    eval_windows: int = 512
    eval_name: Optional[str] = None  # None = <suite>_eval (+ _<scale> off the cpu scale)
    diagnose: bool = False       # also the diagnostics of every thinking run
    eval_probes: bool = False    # also evaluate.py's start probes (on the first eval set)
    jobs: int = 1                # runs trained, then scored on eval_sets, in parallel (processes)
    threads: int = 1             # torch threads per run
    out_dir: str = "results"
    # inference-only rows scored on eval_sets: name -> {run: <a name in runs>, eval: {EvalConfig
    # field: value}}: that run's checkpoint (every seed) scored with those fields set
    eval_variants: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        valid = sorted(EvalConfig.__dataclass_fields__)
        for name, v in self.eval_variants.items():
            where = f"eval_variants.{name}"
            check_rules([(isinstance(v, dict) and set(v) == {"run", "eval"} and isinstance(v["eval"], dict),
                     f"{where} must be {{run: <a run of the suite>, eval: {{<EvalConfig field>: value}}}}")])
            check_rules([(v["run"] in self.runs, f"{where}: run {v['run']!r} is not in suite {self.suite}: "
                     f"choose one of {', '.join(self.runs)}"),
                    (name not in self.runs, f"{where}: {name} is a run of the suite already: rename it")]
                   + [(k in valid, f"{where}: unknown EvalConfig field {k!r}: choose from {', '.join(valid)}")
                      for k in v["eval"]])


@dataclass
class EvalConfig:
    """evaluate.py: a checkpoint's thinking curve on any text and under graded shift."""
    checkpoint: Optional[str] = None     # None = the newest finished run under train_out_dir
    train_out_dir: str = "out_ebt"       # where train.py wrote its runs
    out_dir: Optional[str] = None        # eval.{json,md,png}; None = <checkpoint folder>/eval
    sets: List[str] = field(default_factory=lambda: [
        "val", "train_seen", "train_unseen", "corrupt_02", "corrupt_05", "corrupt_10",
        "corrupt_20", "lower"])         # built-in sets of the training text (nanoebm/shift.py)
    texts: List[str] = field(default_factory=list)  # UTF-8 files / parquet folders to score too
    drop_unknown: bool = False           # char: drop characters outside the vocabulary
    data_path: Optional[str] = None      # None = the run's own data.data_path
    bpe_encoding: Optional[str] = None   # BPE: where the rank file is now (content must match)
    baseline: Optional[str] = None       # a plain-transformer checkpoint: the shift axis r
    steps: int = 8                       # think steps scored: k = 0..steps (at least K)
    windows: int = 512                   # fixed windows per set (evenly spaced)
    batch_size: int = 32
    bon: int = 4                         # best-of-N chains at K (<= 1: off)
    think_noise: float = 0.5             # best-of-N: the noise that makes the chains differ
    think_neutral: Optional[bool] = None  # sharpening-neutral steps (None = the checkpoint's setting)
    bootstrap: int = 1000                # resamples of windows for the 95% intervals
    seed: int = 2024                     # corruption, chain noise, bootstrap
    diagnose: bool = False               # also write diagnose.{json,md} (nanoebm/diagnose.py)
    probes: bool = False                 # + start probes on the first set (nanoebm/startprobe.py)
    rerank_topk: int = 64                # verifier rerank over S1's top-k (BPE vocabularies)
    task_lines: int = 100                # addition tasks: answers decoded per split (exact match)
    device: str = "auto"

    def __post_init__(self):
        check_rules([(self.steps >= 0, "steps must be >= 0"),
                (self.windows >= 1 and self.batch_size >= 1, "windows and batch_size must be >= 1"),
                (self.think_noise >= 0, "think_noise must be >= 0"),
                (self.bootstrap >= 10, "bootstrap must be >= 10 resamples"),
                (self.rerank_topk >= 1 and self.task_lines >= 0,
                 "rerank_topk must be >= 1 and task_lines >= 0")])


@dataclass
class VizConfig:
    """viz.py: pictures computed from a checkpoint's real energies (see viz.py for the modes)."""
    checkpoint: Optional[str] = None  # None: the newest out_ebt/run_*/final.pt
    mode: str = "topk"           # one of VIZ_MODES (viz.py's docstring says what each draws)
    prompt: str = "ROMEO:"
    steps: int = 8               # think steps to trace (K)
    topk: int = 20               # topk: bars for the lowest-energy next tokens
    topk_think: int = 10         # traj: tokens whose trajectories are drawn
    traj_space: str = "logits"   # traj: logits (centred) | probs
    multi_trajectories: int = 5  # gap_multi: noisy chains overlaid
    think_noise: float = 0.3     # gap_multi: std of the noise added to z before each step
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

    def __post_init__(self):
        min_steps = 0 if self.mode in ("topk", "eval") else 1
        counts = ("topk", "topk_think", "multi_trajectories", "tokens", "batch_size", "eval_iters",
                  "dpi")
        check_rules(choice_rules(self, "", {"mode": VIZ_MODES, "writer": ("auto", "gif", "mp4"),
                                   "split": ("train", "val"), "traj_space": ("logits", "probs")})
               + [(self.steps >= min_steps,
                   f"steps={self.steps}: mode={self.mode} needs steps >= {min_steps}")]
               + [(getattr(self, n) >= 1, f"{n}={getattr(self, n)} must be >= 1") for n in counts]
               + [(self.grid >= 3 and self.span > 0,
                   f"grid={self.grid}, span={self.span}: need grid >= 3 and span > 0")])


VIZ_MODES = ("topk", "gap", "gap_multi", "bowl_panels", "bowl_anim", "traj", "surface3d",
             "surface_anim", "margin", "eval", "per_token")


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
    gen_compile: bool = True     # also time thinking generation with its compiled think step
    threads: int = 0             # torch CPU threads (0 = torch's default)
    out: str = "bench.json"
    seed: int = 1337
