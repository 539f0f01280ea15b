"""The CUDA path (skipped without a CUDA device; lab/gpu_check.sh runs these on a GPU):
the bf16 training step finite and close to fp32, train.py in bf16 with fused AdamW,
train.compile=true (context stream compiled) giving the eager losses, cached == uncached greedy
generation, and the default config's peak allocator memory against the pre-step estimate.

    uv run pytest -m cuda
"""
import json
import math
from pathlib import Path

import pytest
import torch

from nanoebm import memory as M
from nanoebm.checkpoint import load_checkpoint
from nanoebm.config import ModelConfig
from nanoebm.generate import generate
from nanoebm.losses import forward_backward
from nanoebm.model import EBT
from tests.conftest import SMALL, compose

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
QUIET = ["model.dropout=0.0", "model.think_noise=0.0", "model.think_lr_random_scale=1.0"]
# CPU measured loss 6e-5 / gradients 0.95% (tests/test_bf16.py); CUDA autocast also runs the
# fused attention in bf16, so twice the CPU tolerances
LOSS_RTOL, GRAD_RTOL = 2e-3, 0.06


@pytest.fixture(autouse=True)
def exact_fp32():
    """The fp32 references without TF32 (train.py switches it on for the whole process)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def cuda_step(bf16: bool, V=512, B=8, T=64):
    torch.manual_seed(0)
    model = EBT(ModelConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=V, block_size=T,
                            dropout=0.0)).cuda().train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(V, (B, T), generator=g).cuda() for _ in range(2))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = forward_backward(model, x, y, scale=1.0)
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_step_finite_and_close_to_fp32():
    l32, g32 = cuda_step(False)
    l16, g16 = cuda_step(True)
    assert math.isfinite(l16.item()) and abs(l16.item() - l32.item()) <= LOSS_RTOL * abs(l32.item())
    assert set(g16) == set(g32) and "alpha" in g32
    for n, g in g32.items():
        assert torch.isfinite(g16[n]).all(), n
        rel = ((g16[n] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel <= GRAD_RTOL, (n, rel)


def test_train_uses_bf16_and_fused_adamw(tmp_path, capsys):
    import train as train_mod
    summary = train_mod.train(compose(*SMALL, "train.device=cuda", f"out_dir={tmp_path}"))
    assert summary["step"] == 2 and math.isfinite(summary["val_loss"])
    assert "device cuda | dtype bfloat16" in capsys.readouterr().out  # dtype=auto on CUDA
    ck = load_checkpoint(Path(summary["run_dir"]) / "final.pt")
    groups = ck["optimizer"]["param_groups"]
    assert len(groups) == 3 and all(g["fused"] for g in groups)  # alpha's group too


def losses(run_dir: Path) -> list:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_compile_gives_the_eager_losses(tmp_path):
    import train as train_mod
    args = [*SMALL, *QUIET, "train.device=cuda", "train.dtype=float32", "train.max_steps=3"]
    eager = train_mod.train(compose(*args, f"out_dir={tmp_path / 'eager'}"))
    comp = train_mod.train(compose(*args, "train.compile=true", f"out_dir={tmp_path / 'comp'}"))
    a, b = losses(Path(eager["run_dir"])), losses(Path(comp["run_dir"]))
    assert len(a) == len(b) == 3
    for la, lb in zip(a, b):
        assert abs(la - lb) <= 1e-3 * abs(la), (a, b)  # inductor fuses the pointwise ops


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_equals_uncached_greedy_generation(bf16):
    torch.manual_seed(0)
    model = EBT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=24, block_size=16,
                            dropout=0.0)).cuda().eval()
    with torch.no_grad():  # sharper than the init: argmax ties far from rounding noise
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    idx = torch.randint(24, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    outs = []
    for cache in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            outs.append(generate(model, idx, 20, kv_cache=cache).tokens)  # slides past 16
    assert torch.equal(outs[0], outs[1])


class RandomTokens:
    """Just enough of TokenData for memory.step_estimate: random windows on the device."""

    def __init__(self, V: int):
        self.V = V

    def get_batch(self, split, B, T, generator, device="cpu", rank=0, world=1):
        x = torch.randint(self.V, (B, T + 1), generator=generator)
        return x[:, :-1].to(device), x[:, 1:].to(device)


def test_default_config_peak_memory_matches_estimate():
    """The default model (6 x 384, batch 64 x 256, bf16 autocast): one full training step's
    allocator peak, and the pre-step estimate (1 and 2 windows, scaled to 64) against it."""
    cfg = compose()
    B, T, V = cfg.data.batch_size, cfg.data.block_size, 65
    torch.manual_seed(0)
    model = EBT(ModelConfig(**{**cfg.model.__dict__, "vocab_size": V, "block_size": T})).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ac = torch.autocast("cuda", dtype=torch.bfloat16)
    row, fixed = M.step_estimate(model, RandomTokens(V), T, "cuda", ac)
    estimate = fixed + B * row
    x, y = RandomTokens(V).get_batch("train", B, T, torch.Generator().manual_seed(0), "cuda")
    for _ in range(2):  # the second step: AdamW's moments exist, as in every later step
        torch.cuda.reset_peak_memory_stats()
        with ac:
            forward_backward(model, x, y, scale=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated()
    print(f"default config step: peak {peak / 1e9:.2f} GB, estimate {estimate / 1e9:.2f} GB")
    assert 0.85 * peak <= estimate <= 1.5 * peak, (peak, estimate)
