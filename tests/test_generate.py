"""KV-cached thinking generation (nanoebm/generate.py): cache exactness, greedy/sampling
semantics, top-k/top-p supports, thinking vs System 1, best-of-N, tokenizer and prompt checks."""
import pytest
import torch

from nanoebm.config import ModelConfig
from nanoebm.generate import encode_prompt, filter_logits, generate, pick_token, propose
from nanoebm.losses import ebt_loss
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think
from tests.conftest import repeat_context
from nanoebm.tokenizer import CharTokenizer, load_bpe, resolve_tokenizer

torch.set_num_threads(1)
V, BS = 24, 16


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=BS, vocab_size=V, dropout=0.0)
    m = EBT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so argmax ties are far from float noise
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def trained():
    """A tiny EBT trained for a few steps on a periodic sequence (thinking gets a signal)."""
    torch.manual_seed(0)
    m = EBT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BS, vocab_size=V, dropout=0.0,
                        think_steps=2))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    data = torch.tensor([(i * 7) % V for i in range(2000)])
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        s = torch.randint(len(data) - BS - 1, (8,), generator=g)
        x = torch.stack([data[i:i + BS] for i in s])
        y = torch.stack([data[i + 1:i + BS + 1] for i in s])
        loss, _ = ebt_loss(m, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(False)


def gen(m, idx, n, seed=0, **kw):
    return generate(m, idx, n, generator=torch.Generator().manual_seed(seed), keep_logits=True, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(use_thinking=False), dict(think_steps=3),
                                dict(think_init="noise", aux_ce_weight=0.0)])
def test_cached_equals_uncached_past_block_size(kw):
    mkw = {k: v for k, v in kw.items() if k in ("think_init", "aux_ce_weight")}
    gkw = {k: v for k, v in kw.items() if k not in mkw}
    m = tiny(**mkw)
    idx = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(1))
    n = BS + 4  # prompt 5 + 20 new > block_size 16: the window slides 9 times
    a = gen(m, idx, n, kv_cache=True, **gkw)
    b = gen(m, idx, n, kv_cache=False, **gkw)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert a.tokens.shape == (2, n)
    assert len(set(a.tokens[0].tolist())) > 1  # a real sequence, not one repeated id


def test_cache_window_matches_a_fresh_forward():
    """Past block_size the prediction must condition on exactly the last block_size tokens."""
    m = tiny()
    idx = torch.randint(V, (1, BS), generator=torch.Generator().manual_seed(2))
    out = gen(m, idx, 6, use_thinking=False)
    seq = torch.cat([idx, out.tokens], 1)
    for i in range(6):  # token i was predicted from seq[: BS + i], cropped to the last BS
        ctx = m.context(seq[:, i:BS + i])
        torch.testing.assert_close(out.logits[:, i], ctx.s1_logits[:, -1], atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_sampling_reproducible():
    m = tiny()
    idx = torch.randint(V, (1, 4), generator=torch.Generator().manual_seed(3))
    g1, g2 = gen(m, idx, 12, seed=1), gen(m, idx, 12, seed=2)
    assert torch.equal(g1.tokens, g2.tokens)  # argmax: the seed does not matter
    assert torch.equal(g1.tokens, g1.logits.argmax(-1))
    s1, s1b, s2 = (gen(m, idx, 12, seed=s, sample=True) for s in (1, 1, 2))
    assert torch.equal(s1.tokens, s1b.tokens)
    assert not torch.equal(s1.tokens, s2.tokens)
    # a vanishing temperature turns sampling back into argmax
    cold = gen(m, idx, 12, seed=5, sample=True, sample_temp=1e-4)
    assert torch.equal(cold.tokens, g1.tokens)


def brute_nucleus(logits, p):
    """Indices of the smallest prefix of the sorted distribution whose mass reaches p."""
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass = [], 0.0
    for i in order:
        keep.append(i)
        mass += probs[i].item()
        if mass >= p:
            break
    return set(keep)


def test_topk_and_top_p_restrict_the_support():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(4)) * 2
    for k in (1, 3, 10):
        f = filter_logits(logits, topk=k)
        for b in range(5):
            support = set(torch.nonzero(f[b].isfinite()).flatten().tolist())
            assert support == set(logits[b].topk(k).indices.tolist())
    for p in (0.05, 0.5, 0.9):
        f = filter_logits(logits, top_p=p)
        for b in range(5):
            support = set(torch.nonzero(f[b].isfinite()).flatten().tolist())
            assert support == brute_nucleus(logits[b], p)
            # the kept logits are untouched: renormalising gives the restricted distribution
            torch.testing.assert_close(f[b][list(support)], logits[b][list(support)])
    assert torch.equal(filter_logits(logits, topk=0, top_p=1.0), logits)  # both off


def test_sampled_tokens_stay_in_the_support():
    m = tiny()
    idx = torch.randint(V, (4, 3), generator=torch.Generator().manual_seed(5))
    out = gen(m, idx, 20, seed=7, sample=True, topk=3)
    top3 = out.logits.topk(3, dim=-1).indices  # (B, N, 3)
    assert (top3 == out.tokens[..., None]).any(-1).all()
    out = gen(m, idx, 20, seed=7, sample=True, sample_top_p=0.6, sample_temp=0.7)
    for b in range(4):
        for i in range(20):
            assert out.tokens[b, i].item() in brute_nucleus(out.logits[b, i] / 0.7, 0.6)
    # pick_token draws from exactly the filtered distribution: empirical frequencies match it
    lg = torch.randn(1, V, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick_token(lg, sample=True, topk=4, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=V).float() / 4000
    target = filter_logits(lg, topk=4).softmax(-1)[0]
    assert (freq[target == 0] == 0).all()
    assert (freq - target).abs().max() < 0.05


def test_thinking_changes_the_distribution_and_lowers_energy(trained):
    idx = torch.tensor([[(i * 7) % V for i in range(10)], [(i * 7 + 3) % V for i in range(10)]])
    ctx = trained.context(idx)
    s1 = propose(trained, ctx, use_thinking=False)
    th = propose(trained, ctx, use_thinking=True, think_steps=4)
    assert (th.logits.softmax(-1) - s1.logits.softmax(-1)).abs().max() > 1e-3
    assert (th.e_final < th.e_init).all()
    assert (th.steps == 4).all() and (s1.steps == 0).all() and s1.e_init is None
    out = gen(trained, idx, 8, think_steps=4)
    assert (out.e_init - out.e_final).mean() > 0
    # think_lr is used: a different step size gives a different candidate
    other = propose(trained, ctx, think_steps=4, think_lr=5.0)
    assert not torch.allclose(other.logits, th.logits)


def test_accept_lower_energy_never_raises_the_energy():
    m = tiny(think_grad="probs")
    idx = torch.randint(V, (16, 6), generator=torch.Generator().manual_seed(8))
    ctx = m.context(idx)
    free = propose(m, ctx, think_steps=3, think_lr=300.0)
    safe = propose(m, ctx, think_steps=3, think_lr=300.0, accept_lower_energy=True)
    assert (free.e_final > free.e_init).any()  # big steps overshoot somewhere...
    assert (safe.e_final <= safe.e_init + 1e-6).all()  # ...and those steps get refused
    assert (safe.steps < 3).any()


def test_best_of_n_picks_the_lowest_final_energy():
    m = tiny(think_init="noise", aux_ce_weight=0.0)
    idx = torch.randint(V, (3, 7), generator=torch.Generator().manual_seed(9))
    ctx = m.context(idx)
    N, K = 5, 2
    got = propose(m, ctx, think_steps=K, think_noise=0.3, n_candidates=N,
                  generator=torch.Generator().manual_seed(11))
    # brute force: the same N chains per row (same draws), each final energy scored on its own
    g = torch.Generator().manual_seed(11)
    ctx_n = repeat_context(ctx, N)
    z0 = initial_logits(m, ctx_n, 1, generator=g)
    finals = think(m, ctx_n, z0, K, noise=0.3, generator=g).final  # (3N, 1, V)
    chosen_any_but_first = False
    for b in range(3):
        energies = []
        for j in range(N):
            row = b * N + j
            one = type(ctx)(kv=[(k[row:row + 1], v[row:row + 1]) for k, v in ctx_n.kv], s1_logits=None)
            energies.append(m.energy(one, finals[row:row + 1].softmax(-1)).item())
        best = min(range(N), key=energies.__getitem__)
        chosen_any_but_first |= best != 0
        assert len(set(round(e, 6) for e in energies)) == N  # the chains really differ
        torch.testing.assert_close(got.logits[b], finals[b * N + best, -1])
        assert got.e_final[b].item() == pytest.approx(energies[best], abs=1e-5)
    assert chosen_any_but_first  # the choice is not trivially the first chain


def test_noise_init_without_s1_head_uses_z0():
    m = tiny(think_init="noise", aux_ce_weight=0.0)
    assert not m.has_s1
    idx = torch.zeros(1, 3, dtype=torch.long)
    a = gen(m, idx, 10, seed=1, use_thinking=False)
    b = gen(m, idx, 10, seed=2, use_thinking=False)
    assert not torch.equal(a.tokens, b.tokens)  # z_0 is fresh noise: the seed picks the text
    assert a.e_init is None and (a.steps == 0).all()


def test_think_noise_changes_the_chain():
    m = tiny()
    ctx = m.context(torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(12)))
    a = propose(m, ctx, think_steps=2)
    b = propose(m, ctx, think_steps=2, think_noise=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a.logits, b.logits)


def test_prompt_encoding_and_tokenizer_overrides(tmp_path):
    tok = CharTokenizer(sorted(set("abc :")))
    ids, dropped = encode_prompt(tok, "ab c:")
    assert tok.decode(ids) == "ab c:" and dropped == []
    with pytest.raises(ValueError, match=r"\['2', 'é'\].*strict_prompt=false"):
        encode_prompt(tok, "a2é")
    ids, dropped = encode_prompt(tok, "a2é b", strict=False)
    assert tok.decode(ids) == "a b" and dropped == ["2", "é"]
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tok, "22", strict=False)

    meta = tok.meta
    assert resolve_tokenizer(meta, tok.vocab_size).chars == tok.chars
    assert resolve_tokenizer(meta, tok.vocab_size, tokenizer="char").chars == tok.chars

    with pytest.raises(ValueError, match="tokenizer=gpt2, but the checkpoint was trained with a char"):
        resolve_tokenizer(meta, tok.vocab_size, tokenizer="gpt2")
    # a BPE rank file (no network): the checkpoint's own encoding, a moved copy, a wrong one
    from tests.test_data_bpe import train_ranks, write_ranks
    ranks = train_ranks("hello world, hello there " * 20, 6)
    f = write_ranks(tmp_path / "small.tiktoken", ranks)
    bpe_meta = load_bpe(str(f)).meta
    bpe = resolve_tokenizer(bpe_meta, bpe_meta["vocab_size"])
    assert bpe.decode(bpe.encode("hello there")) == "hello there"
    moved = write_ranks(tmp_path / "moved.tiktoken", ranks)
    assert resolve_tokenizer(bpe_meta, bpe_meta["vocab_size"], bpe_encoding=str(moved)).sha256 == bpe.sha256
    other = write_ranks(tmp_path / "other.tiktoken", train_ranks("the quick brown fox jumps over " * 20, 8))
    with pytest.raises(ValueError, match="not the one the checkpoint was trained with"):
        resolve_tokenizer(bpe_meta, bpe_meta["vocab_size"], bpe_encoding=str(other))
    assert resolve_tokenizer({}, bpe.vocab_size, bpe_encoding=str(f)).vocab_size == bpe.vocab_size
    with pytest.raises(ValueError, match="model's vocabulary has 300"):
        resolve_tokenizer({}, 300, bpe_encoding=str(f))
    with pytest.raises(ValueError, match="no tokenizer"):
        resolve_tokenizer({}, 300)
    with pytest.raises(ValueError, match="tokenizer=char"):
        resolve_tokenizer({}, 300, tokenizer="char")


def test_the_plain_transformer_generates_greedily_from_its_s1_head():
    """A baseline (think_steps=0) has no energy: generation is argmax of its S1 logits, token
    by token, with and without the KV cache."""
    m = tiny(think_steps=0)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    out = generate(m, idx, 6)
    seq = idx
    for _ in range(6):  # the reference: the full window again, argmax of the last S1 logits
        seq = torch.cat([seq, m.context(seq).s1_logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, seq[:, 5:])
    assert torch.equal(generate(m, idx, 6, kv_cache=False).tokens, out.tokens)
