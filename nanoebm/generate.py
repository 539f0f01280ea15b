"""Thinking generation with a KV cache.

Per new token:
  1. the context stream has already run over the window; its per-layer keys/values are cached,
  2. z_0 for the LAST position only (S1 logits or noise), shape (B, 1, V),
  3. `think` runs K steps on that one candidate: each step is one candidate-stream pass (and its
     gradient) for one position that attends to the cached keys: O(layers x context),
  4. pick a token from the final candidate (argmax, or sample with temperature/top-k/top-p),
  5. extend the cache by that token: one context-stream pass for one position.
Without the cache (kv_cache=false) step 5 is replaced by re-running the context stream over the
whole window for every token (same tokens, same logits: tests check it). The reference
implementation does even more: it also re-runs the whole prefix through every think step.

Best-of-N (n_candidates=N): N chains per token, each with its own noise, run as one batch (N
queries at the same position, sharing the row's cache); each chain's final energy is measured
and the chain with the lowest one is kept (self-verification, the paper's Sec. 3). The think steps
themselves live in nanoebm/think_at.py (eager, or compiled with compile=True).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanoebm.model import EBT, Context
from nanoebm.think import initial_logits
from nanoebm.think_at import Thinker


@dataclass
class Proposal:
    """The next-token candidate for each row, after thinking."""
    logits: torch.Tensor              # (B, V) final candidate logits (the model's next-token guess)
    e_init: torch.Tensor | None       # (B,) energy of the first candidate (None: no thinking)
    e_final: torch.Tensor | None      # (B,) energy of the final candidate
    steps: torch.Tensor               # (B,) think steps that moved the candidate


@dataclass
class GenOut:
    tokens: torch.Tensor              # (B, N) the new tokens
    steps: torch.Tensor               # (B, N) think steps per token
    e_init: torch.Tensor | None       # (B, N) energy before thinking, per token
    e_final: torch.Tensor | None      # (B, N) energy after thinking, per token
    logits: torch.Tensor | None       # (B, N, V) candidate logits per token (keep_logits=True)
    seconds: float                    # wall time, prefill included
    compile_seconds: float = 0.0      # of which compiling the think step (compile=True)


def propose(model: EBT, ctx: Context, *, use_thinking: bool = True, think_steps: int | None = None,
            think_lr: float | None = None, think_noise: float = 0.0,
            accept_lower_energy: bool = False, n_candidates: int = 1,
            generator: torch.Generator | None = None, report_energy: bool = True,
            thinker: Thinker | None = None) -> Proposal:
    """Next-token candidate logits for the last context position, after thinking. The final
    energy is computed when best-of-N needs it or report_energy asks for it."""
    cfg = model.cfg
    K = cfg.eval_think_steps if think_steps is None else think_steps
    B = ctx.kv[0][0].shape[0]
    if not use_thinking or K == 0 or not model.has_energy:
        # System 1 when the model has that head; otherwise z_0 itself (noise/zeros, no steps)
        mode = "s1" if model.has_s1 else None
        z0 = initial_logits(model, ctx, 1, mode=mode, generator=generator)  # (B, 1, V)
        return Proposal(z0[:, -1].float(), None, None, torch.zeros(B, device=z0.device))
    N = n_candidates
    thinker = thinker or Thinker(model)
    # N chains per row for the same next token: one S1 start shared, or N draws of noise/zeros
    z0 = initial_logits(model, ctx, 1 if cfg.think_init == "s1" else N, generator=generator)
    z0 = z0.expand(B, N, cfg.vocab_size)  # (B, N, V)
    out = thinker.think(thinker.position(ctx), z0, K, noise=think_noise, lr=think_lr,
                        accept_lower_energy=accept_lower_energy,
                        final_energy=N > 1 or report_energy, generator=generator)
    # a step "moved" a chain when it changed any logit (accept_lower_energy may refuse it)
    zs = [z0] + out.logits
    steps = sum((b != a).any(-1).float() for a, b in zip(zs, zs[1:]))  # (B, N)
    rows = torch.arange(B, device=z0.device)
    best = out.final_energy.argmin(1) if N > 1 else torch.zeros_like(rows)  # lowest E wins
    e_final = out.final_energy[rows, best] if out.final_energy is not None else None
    return Proposal(logits=out.final[rows, best].float(), e_init=out.energies[0][rows, best],
                    e_final=e_final, steps=steps[rows, best])


def filter_logits(logits: torch.Tensor, topk: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set logits (B, V) outside the top-k / nucleus support to -inf. The nucleus is the
    smallest set of most likely tokens whose probability mass reaches top_p (top-1 always)."""
    if topk and topk < logits.shape[-1]:
        kth = logits.topk(topk, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # (B, V) each
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_token(logits: torch.Tensor, *, sample: bool = False, sample_temp: float = 1.0,
               topk: int | None = None, sample_top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. sample=false is argmax: deterministic, no randomness."""
    if not sample:
        return logits.argmax(-1)
    logits = filter_logits(logits / sample_temp, topk, sample_top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: EBT, idx: torch.Tensor, max_new_tokens: int, *, kv_cache: bool = True,
             sample: bool = False, sample_temp: float = 1.0, topk: int | None = None,
             sample_top_p: float | None = None, generator: torch.Generator | None = None,
             on_token=None, keep_logits: bool = False, report_energy: bool = True,
             compile: bool = False, **think_kw) -> GenOut:
    """Continue idx (B, T) by max_new_tokens tokens. think_kw go to `propose` (use_thinking,
    think_steps, think_lr, think_noise, accept_lower_energy, n_candidates). on_token(ids (B,))
    is called after every token (streaming). report_energy=False skips the final-energy pass
    where nothing else needs it (e_init/e_final are then None); compile=True runs the think
    steps through torch.compile (the first token pays the compilation)."""
    t0 = time.time()
    thinker = Thinker(model, compile=compile) if model.has_energy else None  # baseline: no steps
    bs = model.cfg.block_size
    seq = idx[:, -bs:]  # (B, T) the model never sees more than block_size tokens
    ctx = model.context(seq) if kv_cache else None  # prefill
    toks, steps, e0s, e1s, logits = [], [], [], [], []
    for i in range(max_new_tokens):
        if not kv_cache:  # the whole window again, every token
            ctx = model.context(seq[:, -bs:])
        prop = propose(model, ctx, generator=generator, report_energy=report_energy,
                       thinker=thinker, **think_kw)
        tok = pick_token(prop.logits, sample=sample, sample_temp=sample_temp, topk=topk,
                         sample_top_p=sample_top_p, generator=generator)  # (B,)
        seq = torch.cat([seq, tok[:, None]], dim=1)  # (B, T+1)
        toks.append(tok)
        steps.append(prop.steps)
        if prop.e_final is not None:
            e0s.append(prop.e_init)
            e1s.append(prop.e_final)
        if keep_logits:
            logits.append(prop.logits)
        if on_token is not None:
            on_token(tok)
        if kv_cache and i < max_new_tokens - 1:
            if ctx.length < bs:  # room left: one context-stream pass for the new token
                ctx = model.context(tok[:, None], past=ctx)
            else:
                # Window full: re-prefill the last block_size tokens. A rolling cache would be
                # wrong here: RoPE positions are absolute (kept keys would need re-rotating, and
                # positions past block_size have no table), and every kept key/value from layer
                # 2 on was computed while attending to the token that now falls out.
                seq = seq[:, -bs:]
                ctx = model.context(seq)
    if idx.device.type == "cuda":
        torch.cuda.synchronize()  # honest timing: wait for queued kernels
    seconds = time.time() - t0
    if not toks:  # max_new_tokens=0
        return GenOut(idx[:, :0], idx[:, :0].float(), None, None, None, seconds)
    return GenOut(tokens=_stack(toks), steps=_stack(steps), e_init=_stack(e0s),
                  e_final=_stack(e1s), logits=_stack(logits), seconds=seconds,
                  compile_seconds=thinker.compile_s if thinker is not None else 0.0)


def _stack(xs: list) -> torch.Tensor | None:
    """N tensors (B, ...) -> (B, N, ...); None for an empty list (nothing recorded)."""
    return torch.stack(xs, 1) if xs else None


# ------------------------------------------------------------------------------ prompt
def encode_prompt(tok, prompt: str, strict: bool = True) -> tuple[list[int], list[str]]:
    """Prompt -> token ids. A char vocabulary can lack some characters: with strict they are an
    error that lists them, otherwise they are dropped (returned so the caller can warn)."""
    dropped = []
    stoi = getattr(tok, "stoi", None)  # only char tokenizers have a closed alphabet
    if stoi is not None:
        dropped = sorted(set(prompt) - stoi.keys())
        if dropped and strict:
            raise ValueError(f"prompt has characters outside the checkpoint's vocabulary: "
                             f"{dropped!r}; remove them or pass strict_prompt=false to drop them")
        prompt = "".join(c for c in prompt if c in stoi)
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty (after dropping unknown characters): give "
                         "prompt=TEXT with at least one token")
    return ids, dropped
