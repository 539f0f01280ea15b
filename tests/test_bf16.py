"""bf16 autocast on CPU (`train.dtype=bfloat16`), the dtype CUDA trains in by default: the whole
training step (double backward included) runs, its loss and every parameter gradient stay
within a stated tolerance of fp32, the quantities the code keeps in fp32 (energies, candidate
logits, CE, alpha) are fp32, and KV-cached generation equals uncached generation.

Tolerance (measured on these tiny EBTs: loss within 6e-5 relative, worst gradient 0.95% in
relative L2 norm): loss 1e-3 relative, each gradient 3% relative L2.

    uv run pytest tests/test_bf16.py
"""
import math

import pytest
import torch

from nanoebm.config import ModelConfig
from nanoebm.generate import generate
from nanoebm.losses import ce, forward_backward
from nanoebm.model import EBT
from nanoebm.think import initial_logits, think
from tests.conftest import SMALL, compose
from tests.test_generate import V as GEN_V, tiny

LOSS_RTOL, GRAD_RTOL = 1e-3, 0.03
bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


def step(autocast: bool, **kw):
    """One training step of a tiny EBT (K=2, the default recipe: S1 start, hybrid gradient,
    Langevin noise, random alpha); the same seed draws the same noise in both precisions."""
    torch.manual_seed(0)
    model = EBT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16,
                            dropout=0.0, **kw)).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(50, (4, 16), generator=g), torch.randint(50, (4, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = forward_backward(model, x, y, scale=1.0)
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [dict(), dict(think_grad="probs"),
                                dict(think_init="noise", aux_ce_weight=0.0, step_embed=True),
                                dict(step_adaln=True, think_neutral=True)])
def test_bf16_step_matches_fp32(kw):
    l32, g32 = step(False, **kw)
    l16, g16 = step(True, **kw)
    assert l16.dtype == torch.float32 and math.isfinite(l16.item())
    assert abs(l16.item() - l32.item()) <= LOSS_RTOL * abs(l32.item())
    assert set(g16) == set(g32) and "alpha" in g32
    for n, g in g32.items():
        assert g16[n].dtype == torch.float32, n  # gradients land on the fp32 master weights
        rel = ((g16[n] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel <= GRAD_RTOL, (n, rel)


def test_bf16_keeps_energies_logits_ce_alpha_fp32():
    torch.manual_seed(0)
    model = EBT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16,
                            dropout=0.0)).train()
    x = torch.randint(50, (2, 16))
    with bf16():
        ctx = model.context(x)
        z0 = initial_logits(model, ctx, 16)
        out = think(model, ctx, z0, 2, create_graph=True, final_energy=True)
        loss = ce(out.final, x)
    assert ctx.kv[0][0].dtype == torch.bfloat16  # autocast is on: the matmuls ran in bf16
    assert ctx.s1_logits.dtype == z0.dtype == torch.float32
    assert all(e.dtype == torch.float32 for e in out.energies + [out.final_energy])
    assert all(z.dtype == torch.float32 for z in out.logits)
    assert loss.dtype == torch.float32 and model.alpha.dtype == torch.float32
    loss.backward()
    assert model.alpha.grad.dtype == torch.float32 and model.alpha.grad.abs() > 0


@pytest.mark.parametrize("kw", [dict(), dict(think_init="noise", aux_ce_weight=0.0)])
def test_bf16_generation_cached_equals_uncached(kw):
    for seed in range(2):
        model = tiny(seed=seed, **kw)
        idx = torch.randint(GEN_V, (2, 5), generator=torch.Generator().manual_seed(seed))
        outs = []
        for cache in (True, False):
            with bf16():
                outs.append(generate(model, idx, 20, kv_cache=cache,  # slides past block 16
                                     generator=torch.Generator().manual_seed(0)))
        assert torch.equal(outs[0].tokens, outs[1].tokens)


def test_train_dtype_bfloat16_on_cpu(tmp_path, capsys):
    import train as train_mod
    summary = train_mod.train(compose(*SMALL, "train.dtype=bfloat16", "train.device=cpu",
                                      f"out_dir={tmp_path}"))
    assert summary["step"] == 2 and math.isfinite(summary["val_loss"])
    assert "dtype bfloat16" in capsys.readouterr().out
