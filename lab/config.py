"""Typed configs of the lab's tools: lab.evaluate, lab.compare and lab.bench. Like
nanoebm/config.py, each dataclass checks its own options in __post_init__; no Hydra here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nanoebm.config import DataConfig, ModelConfig, check_rules


@dataclass
class EvalConfig:
    """evaluate.py: a checkpoint's thinking curve on any text and under graded shift."""
    checkpoint: Optional[str] = None     # None: the newest finished run under train_out_dir, else bundled
    train_out_dir: str = "out_ebt"       # where train.py wrote its runs
    out_dir: Optional[str] = None        # eval.{json,md,png}; None = <checkpoint folder>/eval (bundled: out_ebt/eval_bundled)
    sets: List[str] = field(default_factory=lambda: [
        "val", "train_seen", "train_unseen", "corrupt_02", "corrupt_05", "corrupt_10",
        "corrupt_20", "lower"])         # built-in sets of the training text (lab/shift.py)
    texts: List[str] = field(default_factory=list)  # UTF-8 files / parquet folders to score too
    drop_unknown: bool = False           # char: drop characters outside the vocabulary
    data_path: Optional[str] = None      # None = the run's own data.data_path
    bpe_encoding: Optional[str] = None   # BPE: where the rank file is now (content must match)
    baseline: Optional[str] = None       # a plain-transformer checkpoint: the shift axis r (bundled EBT: bundled_baseline)
    steps: int = 8                       # think steps scored: k = 0..steps (at least K)
    windows: int = 512                   # fixed windows per set (evenly spaced)
    batch_size: int = 32
    bon: int = 4                         # best-of-N chains at K (<= 1: off)
    think_noise: float = 0.5             # best-of-N: the noise that makes the chains differ
    think_neutral: bool = True           # sharpening-neutral steps (lab/LOG.md); false: plain steps
    bootstrap: int = 1000                # resamples of windows for the 95% intervals
    seed: int = 2024                     # corruption, chain noise, bootstrap
    diagnose: bool = False               # also write diagnose.{json,md} (lab/diagnose.py)
    probes: bool = False                 # + start probes on the first set (lab/startprobe.py)
    controls: bool = True                # + calibration and dynamic-evaluation controls (lab/controls.py)
    tt_lr: Optional[float] = None        # dynamic evaluation's SGD step (None: chosen on val)
    tt_steps: Optional[int] = None       # its SGD steps per batch of windows (None: chosen on val)
    rerank_topk: int = 64                # verifier rerank over S1's top-k (BPE vocabularies)
    task_lines: int = 100                # addition tasks: answers decoded per split (exact match)
    device: str = "auto"
    threads: int = 0                     # torch CPU threads; 0 = auto (one for a small model)

    def __post_init__(self):
        check_rules([(self.steps >= 0, "steps must be >= 0"),
                (self.windows >= 1 and self.batch_size >= 1, "windows and batch_size must be >= 1"),
                (self.think_noise >= 0, "think_noise must be >= 0"),
                (self.bootstrap >= 10, "bootstrap must be >= 10 resamples"),
                (self.rerank_topk >= 1 and self.task_lines >= 0,
                 "rerank_topk must be >= 1 and task_lines >= 0"),
                (self.tt_lr is None or self.tt_lr > 0, f"tt_lr={self.tt_lr} must be > 0"),
                (self.tt_steps is None or 0 <= self.tt_steps <= 16,
                 f"tt_steps={self.tt_steps} must be in 0..16"),
                ((self.tt_lr is None) == (self.tt_steps is None),
                 "give tt_lr and tt_steps together (or neither: both are chosen on val)")])


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
    # lab.evaluate on every thinking run (lab/scorecard.py), the suite's plain transformer
    # of the same seed as the shift axis: results/<eval_name>.{json,md,png}
    eval_sets: List[str] = field(default_factory=list)  # e.g. [val, corrupt_05]; empty = off
    eval_windows: int = 512
    eval_name: Optional[str] = None  # None = <suite>_eval; + _<scale> off the cpu scale unless it names it
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
