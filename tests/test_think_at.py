"""Generation's one-position think step (nanoebm/think_at.py) against the straightforward paths:
the hand-written dE/dp against autograd on EBT.energy, the steps against `think` for every
thinking option, batched best-of-N against a chain-by-chain loop, the final-energy pass only
when something reads it, and compiled generation against eager.

    uv run pytest tests/test_think_at.py            # the compiled ones are marked slow
"""
import pytest
import torch

from nanoebm import think_at
from nanoebm.config import ModelConfig
from nanoebm.generate import generate, propose
from tests.conftest import repeat_context
from nanoebm.model import EBT, Context
from nanoebm.think import think
from nanoebm.think_at import PaddedKV, Thinker, energy_grad_at, position

torch.set_num_threads(1)
V, BS = 24, 16


def tiny(seed=0, double=False, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=BS, vocab_size=V, dropout=0.0)
    m = EBT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # sharper than the 0.02 init: real gradients, argmax far from ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
        if m.adaln is not None:  # AdaLN starts at zero: make every step's modulation real
            m.adaln.normal_(0.0, 0.3)
    m = m.double() if double else m
    return m.requires_grad_(False)


def prompt(B=2, T=7, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [dict(), dict(step_embed=True),
                                dict(n_head=4, n_layer=1), dict(step_adaln=True),
                                dict(step_adaln=True, step_embed=True)])
def test_energy_gradient_matches_autograd_on_the_full_model(kw):
    m = tiny(double=True, **kw)
    ctx = m.context(prompt(B=3))
    N = 4
    p = torch.randn(3, N, V, dtype=torch.double).softmax(-1)  # (B, N, V)
    E, g = energy_grad_at(m, position(m, ctx.kv, ctx.length), p, step=1)
    # reference: the training path (explicit attention), every chain its own row, autograd
    pr = p.reshape(3 * N, 1, V).requires_grad_(True)
    with torch.enable_grad():
        E_ref = m.energy(repeat_context(ctx, N), pr, step=1)  # (3N, 1)
        g_ref, = torch.autograd.grad(E_ref.sum(), pr)
    torch.testing.assert_close(E, E_ref.view(3, N), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref.view(3, N, V), rtol=0, atol=1e-12)
    assert g.abs().max() > 1e-3
    # the same through a padded cache: unused slots hold garbage, the bias hides them
    padded = PaddedKV(BS)
    longer = [(torch.randn_like(k.repeat(1, 1, 2, 1)),) * 2 for k, _ in ctx.kv]  # 14 slots
    padded(Context(kv=longer, s1_logits=None))
    kv, bias = padded(ctx)
    E_pad, g_pad = energy_grad_at(m, position(m, kv, ctx.length, bias), p, step=1)
    assert kv[0][0].shape[2] == BS
    torch.testing.assert_close((E_pad, g_pad), (E, g), rtol=0, atol=1e-12)


# every think option that acts at inference (the fast step has a branch for each, and no other)
OPTIONS = [dict(), dict(think_grad="probs"), dict(think_grad="logits", softmax_temperature=0.7),
           dict(entropy_weight=0.1), dict(think_max_move=0.05), dict(think_prox_weight=0.0),
           dict(think_neutral=True), dict(think_neutral=True, think_grad="probs", think_max_move=0.05),
           dict(mixture_stopgrad=True), dict(step_embed=True), dict(step_adaln=True)]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "default")
@pytest.mark.parametrize("accept", [False, True])
def test_thinker_gives_what_think_gives(kw, accept):
    """Every step's candidate and energy, and the final energy, as `think` computes them on
    the last position (same noise draws)."""
    m = tiny(double=True, **kw)
    ctx = m.context(prompt())
    z0 = ctx.s1_logits[:, -1:]  # (B, 1, V)
    ref = think(m, ctx, z0, 3, noise=0.3, accept_lower_energy=accept, final_energy=True,
                generator=torch.Generator().manual_seed(5))
    got = Thinker(m).think(position(m, ctx.kv, ctx.length), z0, 3, noise=0.3,
                           accept_lower_energy=accept, final_energy=True,
                           generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.energies, [e.detach() for e in ref.energies], rtol=0, atol=1e-10)
    torch.testing.assert_close(got.final_energy, ref.final_energy, rtol=0, atol=1e-10)
    assert torch.equal(got.final.argmax(-1), ref.final.argmax(-1))  # the same greedy tokens
    assert (ref.logits[-1] - z0).abs().max() > 1e-3  # the steps really moved


def looped_best_of_n(m, ctx, N, K, noise, accept, seed):
    """Reference best-of-N: every chain of every row on its own, step by step, with the training
    path's energy and autograd (default think options: hybrid, prox pull to z_0). The draws are
    the batched ones: z_0 (B, N, V), then one (B, N, V) noise tensor per step."""
    g = torch.Generator().manual_seed(seed)
    B = ctx.kv[0][0].shape[0]
    z0 = torch.randn(B, N, V, generator=g) * m.cfg.think_init_std
    eps = [noise * torch.randn(B, N, V, generator=g) for _ in range(K)]
    alpha, prox = m.alpha.clamp(min=1e-4), m.cfg.think_prox_weight
    finals, energies, picks = torch.zeros(B, N, V), torch.zeros(B, N), []
    for b in range(B):
        row = Context(kv=[(k[b:b + 1], v[b:b + 1]) for k, v in ctx.kv], s1_logits=None)
        for j in range(N):
            z = z0[b, j].view(1, 1, V)
            for k in range(K):
                z = z + eps[k][b, j]
                with torch.enable_grad():
                    p = z.softmax(-1).requires_grad_(True)
                    E = m.energy(row, p)
                    grad, = torch.autograd.grad(E.sum(), p)
                z_next = z - alpha * (grad + prox * (z - z0[b, j]))
                if accept and not m.energy(row, z_next.softmax(-1)) < E:
                    z_next = z
                z = z_next
            finals[b, j], energies[b, j] = z[0, 0], m.energy(row, z.softmax(-1)).item()
        picks.append(int(energies[b].argmin()))
    return finals, energies, picks


@pytest.mark.parametrize("accept", [False, True])
def test_batched_best_of_n_equals_the_looped_one(accept):
    m = tiny(think_init="noise", aux_ce_weight=0.0)
    ctx = m.context(prompt(B=3))
    N, K, noise = 5, 3, 0.3
    finals, energies, picks = looped_best_of_n(m, ctx, N, K, noise, accept, seed=11)
    # the same chains, all N at once
    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(3, N, V, generator=g)
    out = Thinker(m).think(position(m, ctx.kv, ctx.length), z0, K, noise=noise,
                           accept_lower_energy=accept, final_energy=True, generator=g)
    torch.testing.assert_close(out.final, finals, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.final_energy, energies, rtol=0, atol=1e-5)
    # ... and propose keeps the same picks
    prop = propose(m, ctx, think_steps=K, think_noise=noise, n_candidates=N,
                   accept_lower_energy=accept, generator=torch.Generator().manual_seed(11))
    assert len(set(picks)) > 1  # the picks are not all the first chain
    for b in range(3):
        torch.testing.assert_close(prop.logits[b], finals[b, picks[b]], rtol=0, atol=1e-5)
        assert prop.e_final[b].item() == pytest.approx(energies[b, picks[b]].item(), abs=1e-5)


@pytest.mark.parametrize("model_kw,gen_kw,per_token", [
    (dict(), dict(report_energy=False), 3),                        # K passes, nothing else
    (dict(), dict(report_energy=True), 4),                         # + the final energy
    (dict(), dict(report_energy=False, n_candidates=3, think_noise=0.3), 4),  # best-of-N needs it
    (dict(), dict(report_energy=False, accept_lower_energy=True), 6),  # + one test per step...
    (dict(), dict(report_energy=True, accept_lower_energy=True), 6),   # ...which is E(z_K) too
    (dict(step_embed=True), dict(report_energy=True, accept_lower_energy=True), 7),  # E(z_K): step K
    (dict(step_adaln=True), dict(report_energy=True, accept_lower_energy=True), 7),
])
def test_final_energy_pass_runs_only_when_read(model_kw, gen_kw, per_token, monkeypatch):
    m = tiny(**model_kw)
    calls = []
    real = think_at.energy_at
    monkeypatch.setattr(think_at, "energy_at", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = generate(m, prompt(), 5, think_steps=3, **gen_kw)
    assert len(calls) == 5 * per_token
    assert (out.e_final is None) == (not gen_kw["report_energy"] and "n_candidates" not in gen_kw)


def compare_compiled(m, idx, n, **kw):
    eager = generate(m, idx, n, keep_logits=True, generator=torch.Generator().manual_seed(3), **kw)
    comp = generate(m, idx, n, keep_logits=True, generator=torch.Generator().manual_seed(3),
                    compile=True, **kw)
    assert torch.equal(comp.tokens, eager.tokens)
    torch.testing.assert_close(comp.logits, eager.logits, rtol=1e-4, atol=1e-4)
    if eager.e_final is not None:
        torch.testing.assert_close(comp.e_final, eager.e_final, rtol=1e-4, atol=1e-4)
    return comp


@pytest.mark.slow
def test_compiled_generation_equals_eager():
    """Greedy and sampled, K = 0, 1, 4, best-of-N and accept_lower_energy off and on, with and
    without the cache, past block_size (prompt 5 + 14 new > 16). Two step graphs in all."""
    m = tiny(n_layer=1, n_embd=16)
    idx = prompt(T=5)
    compare_compiled(m, idx, 14, think_steps=0)
    c = compare_compiled(m, idx, 14, think_steps=1)
    assert c.compile_seconds > 0 and len(set(c.tokens[0].tolist())) > 1
    compare_compiled(m, idx, 14, think_steps=4, sample=True)  # the same graph, K=4
    compare_compiled(m, idx, 14, think_steps=4, kv_cache=False, sample=True, n_candidates=3,
                     think_noise=0.3, accept_lower_energy=True)


@pytest.mark.slow
def test_compiled_generation_with_step_adaln_and_think_neutral():
    """The compiled step reads the folded AdaLN maps and projects the sharpening part out."""
    m = tiny(n_layer=1, n_embd=16, step_adaln=True, think_neutral=True)
    compare_compiled(m, prompt(T=5), 14, think_steps=3, n_candidates=2, think_noise=0.3,
                     accept_lower_energy=True)


def test_failed_compilation_falls_back_to_eager(monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run
    monkeypatch.setattr(think_at.torch, "compile", broken)
    m = tiny()
    out = generate(m, prompt(), 6, think_steps=2, compile=True)
    ref = generate(m, prompt(), 6, think_steps=2)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.e_final, ref.e_final)  # the compiled path's padded cache
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert lines == ["note: torch.compile of the think step failed (RuntimeError: no C++ "
                     "compiler found); thinking runs eagerly"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_generation_equals_eager_on_cuda():
    """CUDA: the compiled step is replayed as a CUDA graph (mode=reduce-overhead)."""
    m = tiny(n_layer=1, n_embd=16).cuda()
    idx = prompt(T=5).cuda()
    for kw in (dict(think_steps=2), dict(think_steps=2, n_candidates=3, think_noise=0.3,
                                         accept_lower_energy=True)):
        runs = [generate(m, idx, 14, keep_logits=True, compile=c, **kw,
                         generator=torch.Generator("cuda").manual_seed(0)) for c in (False, True)]
        eager, comp = runs
        assert torch.equal(comp.tokens, eager.tokens)
        torch.testing.assert_close(comp.logits, eager.logits, rtol=1e-3, atol=1e-3)
