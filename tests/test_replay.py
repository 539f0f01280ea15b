"""The reference System-2 recipe: replay buffer, Langevin noise, randomised alpha and step count,
the ebt_s1/ebt_s2 presets, and exact resume with the energy-shaping state."""
import random
from pathlib import Path

import pytest
import torch

import nanoebm.losses as losses
from nanoebm.config import ModelConfig
from nanoebm.losses import ebt_loss, train_think_steps
from nanoebm.shaping import EnergyShaping, ReplayBuffer
from nanoebm.model import EBT
from nanoebm.think import think
import train as train_py
from tests.conftest import SMALL, compose

V, T = 11, 8


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=V, dropout=0.0,
                think_noise=0.0, think_lr_random_scale=1.0)  # deterministic unless asked
    base.update(kw)
    return ModelConfig(**base)


def batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def run_train(overrides, out_dir):
    """train.py's train(cfg) on the config the command line would build."""
    cfg = compose(*overrides, f"out_dir={out_dir}")
    return train_py.train(cfg), cfg


# ------------------------------------------------------------------------- replay buffer
def test_replay_buffer_is_fifo_and_samples_without_repeats():
    rb = ReplayBuffer(size=3, fraction=0.5)
    assert rb.sample(4) is None  # empty: nothing to replay yet
    for i in range(5):  # records i = 0..4, one per push; only the newest 3 survive
        rb.push(torch.full((1, T), i), torch.full((1, T), i), torch.full((1, T, V), float(i)))
    assert rb.n == 3 and sorted(rb.x[:, 0].tolist()) == [2, 3, 4]
    assert torch.equal(rb.z[:, 0, 0].long(), rb.x[:, 0])  # z stays with its window
    idx = rb.sample(4)
    assert len(idx) == 2 and len(set(idx.tolist())) == 2  # 0.5 * B rows, distinct
    assert len(rb.sample(100)) == 3  # capped by the records held
    rb.fraction = 0.25
    assert len(rb.sample(8)) == 2  # replay_fraction sets how many rows


def test_replay_rows_restart_from_stored_final_candidate_of_same_window(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny(replay_buffer_size=8, replay_fraction=0.5, think_steps=2)
    model = EBT(cfg)
    sh = EnergyShaping(cfg, model)
    starts = []
    real_think = losses.think

    def spy(model, ctx, z0, steps, **kw):
        out = real_think(model, ctx, z0, steps, **kw)
        starts.append((z0.detach().clone(), out.final.detach().clone()))
        return out

    monkeypatch.setattr(losses, "think", spy)
    x1, y1 = batch(B=4, seed=1)
    ebt_loss(model, x1, y1, shaping=sh)
    assert sh.replay.n == 4
    for i in range(4):  # stored: the final candidate thinking reached on that window
        j = [k for k in range(4) if torch.equal(sh.replay.x[k], x1[i])][0]
        assert torch.equal(sh.replay.z[j], starts[0][1][i]) and torch.equal(sh.replay.y[j], y1[i])
    x2, y2 = batch(B=4, seed=2)
    loss, m = ebt_loss(model, x2, y2, shaping=sh, want_metrics=True)
    z0 = starts[1][0]
    assert z0.shape[0] == 4 + 2  # replay_fraction * B extra rows
    for r in range(4, 6):  # each replay row starts at the stored candidate of its own window
        j = [k for k in range(sh.replay.size) if k < 4 and torch.equal(sh.replay.z[k], z0[r])]
        assert j, "replay row does not start from a stored final candidate"
    assert sh.replay.n == 8  # fresh rows only are pushed
    model.eval()  # evaluation never replays
    ebt_loss(model, x2, y2, shaping=sh)
    assert starts[-1][0].shape[0] == 4


def test_replay_needs_thinking():
    with pytest.raises(ValueError, match="think_steps"):
        EnergyShaping(tiny(replay_buffer_size=4, think_steps=0), EBT(tiny(think_steps=0)))


# ------------------------------------------------------- think_noise, randomised alpha/K
def test_langevin_noise_adds_gaussian_before_each_step_in_training_only():
    torch.manual_seed(0)
    cfg = tiny(think_grad="logits", think_noise=0.7)
    model = EBT(cfg)
    x, y = batch()
    ctx = model.context(x)
    z0 = torch.zeros(4, T, V)
    out = think(model, ctx, z0, 1, lr=1e-12)  # alpha ~ 0: z1 = z0 + noise
    assert abs(out.logits[0].std().item() - 0.7) < 0.05
    assert think(model, ctx, z0, 1, lr=1e-12, noise=0.0).logits[0].abs().max() < 1e-9
    # ebt_loss: noisy (so two calls differ) in training, deterministic in eval
    l1, _ = ebt_loss(model, x, y)
    l2, _ = ebt_loss(model, x, y)
    assert l1.item() != l2.item()
    model.eval()
    assert ebt_loss(model, x, y)[0].item() == ebt_loss(model, x, y)[0].item()


def test_think_lr_random_scale_draws_alpha_per_token_in_training_only(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny(think_grad="logits", think_lr=2.0)
    model = EBT(cfg)
    x, _ = batch()
    ctx = model.context(x)
    z0 = torch.randn(4, T, V)
    r = z0.clone().requires_grad_(True)
    g, = torch.autograd.grad(model.energy(ctx, torch.softmax(r, -1)).sum(), r)  # (B, T, V)
    z1 = think(model, ctx, z0, 1, random_scale=3.0).logits[0]
    alpha = (z0 - z1) / g  # per element; must be one value per token
    a_tok = alpha[..., 0]
    torch.testing.assert_close(alpha, a_tok.unsqueeze(-1).expand_as(alpha), rtol=1e-3, atol=1e-3)
    assert a_tok.min() >= 2.0 / 3 - 1e-3 and a_tok.max() <= 2.0 * 3 + 1e-3
    assert a_tok.std() > 0.3  # really drawn per token
    # ebt_loss passes the scale only in training
    seen, real_think = [], losses.think
    monkeypatch.setattr(losses, "think",
                        lambda *a, **kw: seen.append(kw["random_scale"]) or real_think(*a, **kw))
    model.cfg = tiny(think_grad="logits", think_lr_random_scale=3.0)
    ebt_loss(model, *batch())
    model.eval()
    ebt_loss(model, *batch())
    assert seen == [3.0, 1.0]


def test_think_steps_random_trains_on_k_to_k_plus_r_and_evaluates_on_k_plus_r():
    random.seed(0)
    model = EBT(tiny(think_steps=1, think_steps_random=2))
    drawn = {train_think_steps(model) for _ in range(60)}
    assert drawn == {1, 2, 3}
    x, y = batch()
    _, m = ebt_loss(model, x, y, want_metrics=True)
    assert sum(k.startswith("ce_k") for k in m) - 1 in drawn  # ce_k0..ce_kK
    model.eval()
    assert {train_think_steps(model) for _ in range(10)} == {3}
    assert model.step_emb is None and EBT(tiny(think_steps=1, think_steps_random=2,
                                               step_embed=True)).step_emb.num_embeddings == 3


# ------------------------------------------------------------------ presets and resume
@pytest.mark.slow
def test_ebt_s1_and_s2_presets_mirror_the_reference_and_run(tmp_path):
    s1, cfg1 = run_train(["experiment=ebt_s1"] + SMALL, tmp_path / "s1")
    m = cfg1.model
    assert (m.think_lr, m.think_lr_learnable, m.think_init, m.think_grad, m.step_embed) == \
        (500.0, True, "noise", "probs", True)
    assert s1["step"] == 2
    s2, cfg2 = run_train(["experiment=ebt_s2"] + SMALL, tmp_path / "s2")
    m = cfg2.model
    assert (m.think_lr, m.think_lr_learnable, m.think_steps_random, m.think_lr_random_scale,
            m.think_noise, m.detach_refine, m.truncate_refine, m.replay_buffer_size) == \
        (5.0, False, 1, 2.0, 3.0, False, True, 192)
    assert "val_loss_k3" in s2 and "val_loss_k4" not in s2  # eval on K + r = 3 steps
    ck = torch.load(Path(s2["run_dir"]) / "final.pt", weights_only=True)
    assert ck["shaping"][0]["replay"]["n"] == 8  # 2 steps x 2 micro-batches x 2 fresh rows


RESUME = [*SMALL, "train.max_steps=4", "train.save_interval=2", "model.dropout=0.1",
          "model.use_contrastive=true",
          "model.replay_buffer_size=4", "model.n_persistent=3", "model.n_chains=3",
          "model.restart_prob=0.3", "model.langevin_noise_scale=0.1", "model.think_noise=0.5"]


def final_state(summary):
    return torch.load(Path(summary["run_dir"]) / "final.pt", weights_only=True)


@pytest.mark.parametrize("kind", ["pcd", "fast_pcd"])
def test_resume_is_exact_with_chains_fast_weights_and_replay(tmp_path, kind):
    args = RESUME + [f"model.contrastive_type={kind}"]
    full, _ = run_train(args, tmp_path / "full")
    ckpt_path = Path(full["run_dir"]) / "ckpt_step_000002.pt"
    resumed, _ = run_train(args + [f"load_checkpoint={ckpt_path}"], tmp_path / "resumed")
    a, b = final_state(full), final_state(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["shaping"][0], b["shaping"][0]
    assert torch.equal(sa["z"], sb["z"]) and torch.equal(sa["x"], sb["x"])
    assert torch.equal(sa["replay"]["z"], sb["replay"]["z"])
    assert all(torch.equal(sa["fast"][n], sb["fast"][n]) for n in sa["fast"])
    if kind == "fast_pcd":
        assert any(f.abs().sum() > 0 for f in sa["fast"].values())
        return
    # control: the same resume without the saved chains/replay state does not reproduce the run
    ck = torch.load(ckpt_path, weights_only=True)
    del ck["shaping"]
    torch.save(ck, tmp_path / "no_state.pt")
    lost, _ = run_train(args + [f"load_checkpoint={tmp_path / 'no_state.pt'}"], tmp_path / "lost")
    c = final_state(lost)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
