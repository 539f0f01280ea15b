"""Generate text from a trained EBT, thinking (descending the energy) before every token.

    uv run python sample.py                                   # newest finished run under out_ebt/
    uv run python sample.py checkpoint=out_ebt/final.pt prompt="HAMLET:" max_new_tokens=500
    uv run python sample.py use_thinking=false                # System 1 only: the baseline LM
    uv run python sample.py sample=true sample_temp=0.9 topk=64 sample_top_p=0.95
    uv run python sample.py n_candidates=4 think_noise=0.5    # best-of-4 by final energy
    uv run python sample.py compile=true                      # torch.compile the think step

Options: SampleConfig below; `python sample.py --cfg job` prints them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import hydra
import torch
from omegaconf import OmegaConf

from nanoebm import runtime as rt
from nanoebm.checkpoint import model_from_checkpoint, open_checkpoint
from nanoebm.config import check_rules
from nanoebm.cli import apply_cli_shims, register_configs
from nanoebm.generate import encode_prompt, generate
from nanoebm.tokenizer import resolve_tokenizer


@dataclass
class SampleConfig:
    checkpoint: Optional[str] = None     # None: the newest finished run under out_dir, else bundled
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
    think_neutral: bool = True           # sharpening-neutral steps (lab/LOG.md); false: plain steps
    # -- decoding
    sample: bool = False                 # false = argmax (greedy, deterministic)
    sample_temp: float = 1.0
    topk: Optional[int] = None           # keep the k most likely tokens (None/0 = all)
    sample_top_p: Optional[float] = None  # nucleus: smallest set with mass >= p (None = all)
    seed: int = 1337
    kv_cache: bool = True
    compile: bool = False                # torch.compile the think step (first token compiles)
    device: str = "auto"
    threads: int = 0                     # torch CPU threads; 0 = auto (one for a small model)
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


class Printer:
    """Streams tokens as they come. Decodes the whole continuation each time and prints the new
    suffix, holding back a trailing partial UTF-8 character (BPE tokens can split one)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, token):  # token: (1,) tensor
        self.ids.append(int(token[0]))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def sample(cfg: SampleConfig) -> list[dict]:
    """Load, encode the prompt, generate num_samples continuations (one batch); print and
    return them."""
    path, ckpt, line = open_checkpoint(cfg.checkpoint, cfg.out_dir)
    print(line)
    try:
        device = rt.pick_device(cfg.device)
    except RuntimeError as e:  # e.g. device=cuda on a machine without CUDA
        raise ValueError(str(e)) from None
    model = model_from_checkpoint(ckpt, device, think_neutral=cfg.think_neutral).eval()
    model.requires_grad_(False)  # thinking needs dE/dz only, never weight gradients
    rt.set_threads(cfg.threads, model.num_params())
    mc = model.cfg
    tok = resolve_tokenizer(ckpt.get("meta"), mc.vocab_size, cfg.tokenizer, cfg.bpe_encoding)
    ids, dropped = encode_prompt(tok, cfg.prompt, cfg.strict_prompt)
    if dropped:
        print(f"warning: dropped prompt characters outside the vocabulary: {dropped!r}")
    if len(ids) > mc.block_size:
        print(f"note: prompt is {len(ids)} tokens; the model sees its last {mc.block_size}")

    K = mc.eval_think_steps if cfg.think_steps is None else cfg.think_steps
    thinking = cfg.use_thinking and K > 0 and model.has_energy  # a baseline has no energy
    if cfg.n_candidates > 1:
        if not thinking:
            raise ValueError("n_candidates > 1 picks among thinking chains: it needs "
                             "use_thinking=true and think_steps >= 1")
        if mc.think_init != "noise" and cfg.think_noise == 0:
            raise ValueError(f"n_candidates={cfg.n_candidates}: every chain starts from the same "
                             f"{mc.think_init} logits, so set think_noise > 0 to make them differ")
    alpha = cfg.think_lr if cfg.think_lr is not None else model.alpha.clamp(min=1e-4).item()
    if thinking:
        mode = (f"thinking {K} steps from {mc.think_init} (alpha {alpha:.4g}, noise "
                f"{cfg.think_noise:g}{', best of %d' % cfg.n_candidates if cfg.n_candidates > 1 else ''}"
                f"{', accept_lower_energy' if cfg.accept_lower_energy else ''}"
                f"{', sharpening-neutral steps' if mc.think_neutral else ''})")
    elif model.has_s1:
        mode = "System 1 logits, no thinking" + ("" if model.has_energy else
                                                 " (a plain transformer: trained with think_steps=0)")
    else:
        mode = (f"no thinking: this model has no System-1 head, so the candidate is the "
                f"{mc.think_init}-initialised z_0 with zero steps (expect noise, not text)")
    decode = (f"sample (temp {cfg.sample_temp:g}, topk {cfg.topk or 'off'}, top_p "
              f"{cfg.sample_top_p or 'off'})" if cfg.sample else "greedy argmax")
    if not cfg.sample and (cfg.topk or cfg.sample_top_p):
        decode += " (topk/sample_top_p act only with sample=true)"
    print(f"device {device} | threads {torch.get_num_threads()} | vocab "
          f"{mc.vocab_size} | {mode} | {decode} | kv_cache {cfg.kv_cache}"
          f"{' | compiled think step' if cfg.compile and thinking else ''}")

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n_rows = cfg.num_samples  # every sample is a row of one batch
    idx = torch.tensor([ids] * n_rows, dtype=torch.long, device=device)  # (num_samples, T)
    printer = Printer(tok) if cfg.stream and n_rows == 1 else None
    if printer:
        print(tok.decode(ids), end="", flush=True)
    out = generate(model, idx, cfg.max_new_tokens, kv_cache=cfg.kv_cache, sample=cfg.sample,
                   sample_temp=cfg.sample_temp, topk=cfg.topk, sample_top_p=cfg.sample_top_p,
                   generator=gen, on_token=printer, use_thinking=cfg.use_thinking,
                   think_steps=K, think_lr=cfg.think_lr, think_noise=cfg.think_noise,
                   accept_lower_energy=cfg.accept_lower_energy, n_candidates=cfg.n_candidates,
                   compile=cfg.compile)
    results = []
    for s in range(n_rows):
        new = out.tokens[s].tolist()
        text = tok.decode(ids + new)
        print("" if printer else text)
        n = len(new)
        r = {"text": text, "tokens": new, "tokens_per_s": n / max(out.seconds, 1e-9),
             "mean_think_steps": out.steps[s].float().mean().item() if n else 0.0}
        line = (f"[sample {s + 1}/{n_rows}] {n} tokens in {out.seconds:.2f}s "
                f"({r['tokens_per_s']:.1f} tok/s{' per sample' if n_rows > 1 else ''}) | "
                f"mean think steps {r['mean_think_steps']:.2f}")
        if out.e_init is not None:
            e0, e1 = out.e_init[s].mean().item(), out.e_final[s].mean().item()
            r.update(energy_before=e0, energy_after=e1, mean_energy_drop=e0 - e1)
            line += f" | mean energy drop per token {e0 - e1:.4f} (E {e0:.4f} -> {e1:.4f})"
        else:
            line += " | energy drop n/a (no thinking)" if n else ""
        if out.compile_seconds:
            line += f" | compiling the think step took {out.compile_seconds:.1f}s of that"
        print(line)
        if s < n_rows - 1:
            print("-" * 40)
        results.append(r)
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg) -> None:
    try:
        sample(OmegaConf.to_object(cfg))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    apply_cli_shims(verbatim=("prompt",), schema=SampleConfig)  # a prompt is free text: commas etc. are literal
    register_configs({"base_sample": SampleConfig})
    main()
