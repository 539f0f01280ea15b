"""viz.py: every mode runs on a tiny trained checkpoint, writes real images, and plots the
model's own numbers (think loop energies, S1 val loss, batched slices == single evaluations)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")

import viz  # noqa: E402
from nanoebm import landscape as L  # noqa: E402
from nanoebm.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from nanoebm.config import DataConfig, ModelConfig, TrainConfig, TrainRunConfig  # noqa: E402
from nanoebm.data import load_data  # noqa: E402
from nanoebm.losses import ce  # noqa: E402
from nanoebm.think import initial_logits, think  # noqa: E402
from nanoebm.tokenizer import tokenizer_from_meta  # noqa: E402
from tests.conftest import REPO, compose  # noqa: E402

pytestmark = pytest.mark.slow  # every test writes picture files from a trained checkpoint

# the viz.py lines of ../shared/seed-commands.md, verbatim (checked against the file below)
SEED_COMMANDS = """\
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=gap --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=gap_multi --steps=8 --multi_trajectories=5
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=bowl_panels --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=bowl_anim --steps=8 --writer=auto
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=traj --steps=8 --topk_think=32
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=surface3d --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=surface_anim --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=margin --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=eval --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=per_token --tokens=3 --steps=8
uv run python viz.py --checkpoint=out_ebt/final.pt --mode=per_token --tokens=3 --steps=8 --per_token_anim=true --writer=gif
uv run python viz.py --checkpoint=out_ebt/final.pt --prompt="ROMEO:" --topk=20
""".splitlines()
VIZ_SMALL = ["grid=9", "dpi=40", "batch_size=4", "eval_iters=2"]  # size-only overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny char checkpoint trained for 20 steps; cwd-relative out_ebt/final.pt inside."""
    import train
    root = tmp_path_factory.mktemp("viz")
    text = (REPO / "shakespeare.txt").read_text(encoding="utf-8")[:40000]
    (root / "small.txt").write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    cfg = TrainRunConfig(
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, think_steps=2),
        data=DataConfig(data_path=str(root / "small.txt"), block_size=16, batch_size=4),
        train=TrainConfig(max_steps=20, warmup_iters=2, eval_interval=1000, eval_iters=1,
                          log_interval=10, save_interval=0, device="cpu"),
        out_dir=str(root / "out_ebt"))
    train.train(cfg)
    return root


def viz_cfg(args: list[str]):
    """Parse viz.py arguments exactly as the command line does (shims, then Hydra)."""
    return compose(*args, config_name="viz")


def run_viz(run_dir, monkeypatch, *args):
    monkeypatch.chdir(run_dir)
    return viz.run(viz_cfg(["--checkpoint=out_ebt/final.pt", "device=cpu", *VIZ_SMALL, *args]))


def pixels(path: Path) -> list[np.ndarray]:
    """Every frame of a PNG/GIF as grey-level arrays; also checks Pillow can decode it."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        frames = []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(np.asarray(im.convert("L"), dtype=np.float32))
    return frames


def assert_picture(path: Path, frames: int | None = None):
    fs = pixels(path)
    assert all(f.var() > 50 for f in fs), f"{path} looks blank"
    if frames is not None:
        assert len(fs) == frames, f"{path}: {len(fs)} frames, expected {frames}"


def test_seed_commands_match_shared_file():
    shared = REPO.parent / "shared" / "seed-commands.md"
    if not shared.exists():
        pytest.skip("no ../shared/seed-commands.md next to this checkout")
    lines = [ln for ln in shared.read_text().splitlines() if ln.startswith("uv run python viz.py")]
    assert lines == SEED_COMMANDS


@pytest.mark.parametrize("line", SEED_COMMANDS, ids=lambda s: "_".join(s.split()[4:6]))
def test_seed_command_runs_and_writes_pictures(run_dir, monkeypatch, capsys, line):
    args = shlex.split(line)[4:]  # after `uv run python viz.py`; the shell strips the quotes
    res = run_viz(run_dir, monkeypatch, *args, "out_dir=viz_out")
    out = capsys.readouterr().out
    written = [Path(p) for p in re.findall(r"^wrote (.+)$", out, flags=re.M)]
    assert written and written == res["files"]
    steps = 8
    for p in written:
        assert p.exists() and p.stat().st_size > 0 and str(p).startswith("viz_out")
        if p.suffix == ".gif":
            assert_picture(p, frames=steps + 1)
        elif p.suffix == ".mp4":  # writer=auto where ffmpeg is installed
            assert p.read_bytes()[4:8] == b"ftyp"
        elif p.suffix == ".png":
            assert_picture(p)
    if "per_token" in line:
        ext = ".gif" if "per_token_anim=true" in line else ".png"
        assert [p.name for p in written] == [f"token_0{i}{ext}" for i in (1, 2, 3)]
    if "--mode" not in line:  # no mode: topk with the given prompt and topk
        assert written == [Path("viz_out/topk_energies.png")] and len(res["ids"]) == 20


def test_cli_entry_point(run_dir):
    """The real `python viz.py` with --key=value (Hydra app, shims, one-line errors)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "viz.py"), "--checkpoint=out_ebt/final.pt",
           "--prompt=ROMEO:", "--topk=5", "dpi=40", "out_dir=cli_out", "device=cpu"]
    r = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote cli_out/topk_energies.png" in r.stdout
    assert not (run_dir / "outputs").exists()  # Hydra writes no outputs/ folder
    with pytest.raises(SystemExit, match="^error: checkpoint not found: missing.pt"):
        viz.run_cli(viz_cfg(["--checkpoint=missing.pt"]))  # what main() does with bad input


def reference_batch(run_dir, split="val", n=1, batch_size=4, seed=1337):
    """The batches viz's batch modes use, rebuilt here from the data module."""
    ckpt = load_checkpoint(run_dir / "out_ebt" / "final.pt")
    data = load_data(DataConfig(**ckpt["config"]["data"]))
    gen = torch.Generator().manual_seed(seed)
    return data, [data.get_batch(split, batch_size, 16, gen) for _ in range(n)]


def load_model(run_dir):
    ckpt = load_checkpoint(run_dir / "out_ebt" / "final.pt")
    return model_from_checkpoint(ckpt).eval(), tokenizer_from_meta(ckpt["meta"])


def test_gap_energies_are_the_think_loops(run_dir, monkeypatch):
    res = run_viz(run_dir, monkeypatch, "mode=gap", "steps=4", "out_dir=o_gap")
    model, _ = load_model(run_dir)
    model.cfg = dataclasses.replace(model.cfg, think_neutral=True)  # viz's default steps
    _, [(x, y)] = reference_batch(run_dir)
    assert torch.equal(res["x"], x) and torch.equal(res["y"], y)
    ctx = model.context(x)
    z0 = initial_logits(model, ctx, x.shape[1])
    out = think(model, ctx, z0, 4, noise=0.0, final_energy=True)
    ref_e = torch.stack([e.mean() for e in out.energies + [out.final_energy]])
    ref_ce = torch.tensor([ce(z, y).item() for z in [z0] + out.logits])
    assert torch.allclose(res["energy"], ref_e, atol=1e-6)
    assert torch.allclose(res["ce"], ref_ce, atol=1e-6)
    assert res["energy"][-1] < res["energy"][0]  # the trained model descends its energy


def test_split_picks_the_split(run_dir, monkeypatch):
    data, _ = reference_batch(run_dir)
    tr = run_viz(run_dir, monkeypatch, "mode=gap", "steps=1", "split=train", "out_dir=o_split")
    row = tr["x"][0].numpy()
    windows = np.lib.stride_tricks.sliding_window_view(data.train.astype(np.int64), len(row))
    assert (windows == row).all(1).any()
    assert not torch.equal(tr["x"], reference_batch(run_dir)[1][0][0])


def test_eval_k0_is_the_s1_val_loss(run_dir, monkeypatch):
    res = run_viz(run_dir, monkeypatch, "mode=eval", "steps=3", "out_dir=o_eval")
    model, _ = load_model(run_dir)
    _, batches = reference_batch(run_dir, n=2)
    with torch.no_grad():
        s1 = sum(ce(model.context(x).s1_logits, y).item() for x, y in batches) / len(batches)
    assert res["loss"][0] == pytest.approx(s1, abs=1e-6)
    assert res["loss_s1"] == pytest.approx(s1, abs=1e-6)
    assert res["bpb"] == pytest.approx([v / math.log(2) for v in res["loss"]])
    assert len(res["loss"]) == 4 and res["batches"] == 2
    table = (run_dir / "o_eval" / "eval.md").read_text()
    assert table.count("\n| ") == 4 and f"{s1:.4f}" in table  # header + k = 0..3 rows
    assert (run_dir / "o_eval" / "eval.json").exists()


def test_bowl_and_surface_pass_through_the_think_points(run_dir, monkeypatch):
    bowl = run_viz(run_dir, monkeypatch, "mode=bowl_panels", "steps=3", "grid=8", "span=2",
                   "out_dir=o_bowl")
    traj = bowl["traj"]
    assert len(bowl["s"]) == 9 and abs(bowl["s"][4]) < 1e-6  # grid made odd: s = 0 is on it
    assert bowl["s"].max() >= 2.0  # at least `span`
    assert torch.allclose(bowl["energy"][:, 4], traj.energy[:, 0], atol=1e-5)
    model, tok = load_model(run_dir)
    ctx = model.context(torch.tensor([tok.encode("ROMEO:")]))
    calls = []
    real_energy = model.energy
    monkeypatch.setattr(model, "energy", lambda *a, **k: calls.append(1) or real_energy(*a, **k))
    surf = L.surface(model, ctx, traj, span=2.0, grid=9, through="each")
    assert len(calls) == 4 + 1  # one batched forward per slice (+1 for the projected path)
    i, j = surf["tokens"]
    for k in range(4):  # slice k contains z_k: its energy there is the think loop's E(z_k)
        e = L.plane_slice(model, ctx, traj.z[k, 0], i, j, surf["path_a"][k:k + 1],
                          surf["path_b"][k:k + 1], step=k)
        assert e.item() == pytest.approx(traj.energy[k, 0].item(), abs=1e-5)
    # a batched grid point equals a lone single-row evaluation of the same candidate
    r, c = 2, 7
    zn = L.normalise(traj.z[1, 0], model.cfg.softmax_temperature).clone()
    zn[i], zn[j] = surf["a"][c], surf["b"][r]
    p = torch.softmax(zn / model.cfg.softmax_temperature, -1).view(1, 1, -1)
    assert real_energy(ctx, p, step=1).item() == pytest.approx(surf["energy"][1, r, c].item(),
                                                               abs=1e-5)


def test_topk_and_margin_energies(run_dir, monkeypatch):
    res = run_viz(run_dir, monkeypatch, "mode=topk", "topk=5", "steps=2", "out_dir=o_topk")
    model, tok = load_model(run_dir)
    ctx = model.context(torch.tensor([tok.encode("ROMEO:")]))
    V = model.cfg.vocab_size
    single = torch.stack([model.energy(ctx, F.one_hot(torch.tensor([[v]]), V).float(), step=2)[0, 0]
                          for v in range(V)])  # one forward per token, no batching
    assert torch.allclose(res["energy"], single.sort().values[:5], atol=1e-5)
    assert res["ids"].tolist() == single.argsort()[:5].tolist()
    m = run_viz(run_dir, monkeypatch, "mode=margin", "steps=2", "out_dir=o_margin")
    _, [(x, y)] = reference_batch(run_dir)
    t = 9  # position t of row 0 is a prompt x[0, :t+1] followed by the candidate
    e = L.onehot_energies(model, model.context(x[:1, :t + 1]), torch.arange(V), step=2)
    true = int(y[0, t])
    assert m["rank"][t].item() == (e < e[true]).sum().item()
    others = torch.cat([e[:true], e[true + 1:]])
    assert m["true_minus_best_other"][t].item() == pytest.approx((e[true] - others.min()).item(),
                                                                 abs=1e-5)
    report = (run_dir / "o_margin" / "margin.txt").read_text()
    assert f"{m['frac_true_lowest']:.4f}" in report and "positions: 64" in report


def test_options_change_the_output(run_dir, monkeypatch):
    probs = run_viz(run_dir, monkeypatch, "mode=traj", "steps=3", "topk_think=4",
                    "traj_space=probs", "out_dir=o_opt")
    logits = run_viz(run_dir, monkeypatch, "mode=traj", "steps=3", "topk_think=4", "out_dir=o_opt")
    tau = 1.0
    assert probs["values"].shape == (4, 4)
    assert torch.allclose(probs["values"], torch.softmax(probs["traj"].z[:, 0] / tau, -1)[:, probs["ids"]])
    z = logits["traj"].z[:, 0]
    assert torch.allclose(logits["values"], (z - z.mean(-1, keepdim=True))[:, logits["ids"]])
    a = run_viz(run_dir, monkeypatch, "mode=gap_multi", "steps=2", "multi_trajectories=3",
                "out_dir=o_opt")["energy"]
    b = run_viz(run_dir, monkeypatch, "mode=gap_multi", "steps=2", "multi_trajectories=3",
                "seed=7", "out_dir=o_opt")["energy"]
    quiet = run_viz(run_dir, monkeypatch, "mode=gap_multi", "steps=2", "multi_trajectories=3",
                    "think_noise=0", "out_dir=o_opt")["energy"]
    assert a.shape == (3, 3) and not torch.equal(a[:, 0], a[:, 1]) and not torch.equal(a, b)
    assert torch.allclose(quiet[:, 0], quiet[:, 2])  # no noise: the chains coincide
    small = pixels(run_dir / "o_opt" / "energy_gap_multi.png")[0].shape
    run_viz(run_dir, monkeypatch, "mode=gap_multi", "steps=2", "dpi=80", "out_dir=o_opt")
    assert pixels(run_dir / "o_opt" / "energy_gap_multi.png")[0].shape[0] > 1.8 * small[0]
    bs = run_viz(run_dir, monkeypatch, "mode=gap", "steps=1", "batch_size=3", "out_dir=o_opt")
    assert bs["x"].shape == (3, 16)


def test_defaults_and_errors(run_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(run_dir)  # no checkpoint: the newest out_ebt/run_*/final.pt
    res = viz.run(viz_cfg(["mode=topk", "topk=3", "dpi=40", "out_dir=o_def"]))
    assert res["files"] == [Path("o_def/topk_energies.png")]
    for bad, msg in [(["mode=nope"], "mode='nope'"), (["writer=avi"], "writer='avi'"),
                     (["mode=gap", "steps=0"], "steps=0"), (["prompt='@#'"], "outside the model"),
                     (["mode=gap", "data_path=" + str(tmp_path / "x.txt")], "not found"),
                     (["grid=2"], "grid=2")]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(msg)):
            viz.run(viz_cfg(["--checkpoint=out_ebt/final.pt", "out_dir=o_def", *bad]))
    other = tmp_path / "moved.txt"  # the corpus moved: data_path points batch modes at it
    other.write_text((run_dir / "small.txt").read_text(encoding="utf-8"), encoding="utf-8")
    ok = viz.run(viz_cfg(["--checkpoint=out_ebt/final.pt", "mode=gap", "steps=1", "dpi=40",
                          f"data_path={other}", "batch_size=2", "out_dir=o_def"]))
    assert ok["x"].shape[0] == 2


def test_writers(run_dir, monkeypatch, tmp_path, capsys):
    """mp4 without ffmpeg -> GIF + note; with an 'ffmpeg' that records its input, every frame
    (steps + 1 of them) is piped to it; a failing ffmpeg also falls back to a GIF."""
    monkeypatch.setattr(viz.P.shutil, "which", lambda name: None)
    r = run_viz(run_dir, monkeypatch, "mode=bowl_anim", "steps=2", "writer=mp4", "out_dir=o_w")
    assert r["files"][0].suffix == ".gif" and "ffmpeg not found" in capsys.readouterr().out
    assert_picture(r["files"][0], frames=3)
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nfor a; do last=$a; done\ncat > \"$last\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(viz.P.shutil, "which", lambda name: str(fake))
    r = run_viz(run_dir, monkeypatch, "mode=bowl_anim", "steps=2", "writer=auto", "out_dir=o_w")
    path = r["files"][0]
    assert path.suffix == ".mp4"
    frame = pixels(run_dir / "o_w" / "bowl_anim.gif")[0]
    assert path.stat().st_size == 3 * frame.size * 3  # 3 RGB frames of the same size
    fake.write_text("#!/bin/sh\nexit 1\n")
    r = run_viz(run_dir, monkeypatch, "mode=surface_anim", "steps=2", "writer=mp4", "out_dir=o_w")
    assert r["files"][0].suffix == ".gif" and "ffmpeg failed" in capsys.readouterr().out
    assert_picture(r["files"][0], frames=3)


@pytest.mark.skipif(not __import__("shutil").which("ffmpeg"), reason="ffmpeg not installed")
def test_real_mp4(run_dir, monkeypatch):
    r = run_viz(run_dir, monkeypatch, "mode=bowl_anim", "steps=2", "writer=auto", "out_dir=o_mp4")
    data = r["files"][0].read_bytes()
    assert r["files"][0].suffix == ".mp4" and data[4:8] == b"ftyp"


class FakeBPE:
    """BPE's shape without data.py's BPE: 5,000 multi-character tokens, "bpt" units."""
    vocab_size = 5000
    meta = {"tokenizer": "fake_bpe"}

    def encode(self, text):
        return [1000 + ord(c) % 50 for c in text]

    def decode(self, ids):
        return "".join(f"w{int(i)} " for i in ids)


def test_large_vocab_bpe_shaped_checkpoint(monkeypatch, tmp_path):
    import dataclasses
    from nanoebm.data import TokenData
    from nanoebm.model import EBT
    mc = ModelConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, think_steps=2,
                     vocab_size=5000, block_size=16)
    torch.manual_seed(0)
    ckpt = {"model": EBT(mc).state_dict(), "model_config": dataclasses.asdict(mc),
            "config": {"data": {"data_path": "corpus", "block_size": 16}}, "meta": FakeBPE.meta}
    torch.save(ckpt, tmp_path / "bpe.pt")
    ids = np.random.default_rng(0).integers(0, 5000, 4000).astype(np.uint16)
    monkeypatch.setattr(viz, "tokenizer_from_meta", lambda meta: FakeBPE())
    monkeypatch.setattr(viz, "load_data", lambda dc: TokenData(ids[:3000], ids[3000:], FakeBPE(), "bpt"))
    monkeypatch.chdir(tmp_path)
    base = ["checkpoint=bpe.pt", "device=cpu", *VIZ_SMALL, "steps=2", "prompt=The future"]
    top = viz.run(viz_cfg(base + ["mode=topk", "topk=6"]))
    assert top["scope"] == "among the 1024 most probable"
    assert len(top["ids"]) == 6 and top["energy"].diff().ge(0).all()
    ev = viz.run(viz_cfg(base + ["mode=eval"]))
    assert "bpt" in ev and "bpt" in (tmp_path / "out_ebt/viz/eval.md").read_text()
    m = viz.run(viz_cfg(base + ["mode=margin"]))
    assert m["n_compared"] == 255 and len(m["rank"]) == 64
    for mode in ("surface3d", "per_token"):
        for p in viz.run(viz_cfg(base + [f"mode={mode}", "tokens=1"]))["files"]:
            assert_picture(p)


def test_real_bpe_checkpoint(tmp_path, monkeypatch):
    """A BPE checkpoint end to end: data.py's tokenizer (a small rank file trained offline, as
    in test_data_bpe), labels decoded from the checkpoint's meta, val bits in bpt."""
    import train
    from tests.test_data_bpe import train_ranks, write_ranks
    text = (REPO / "shakespeare.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ranks = write_ranks(tmp_path / "small.tiktoken", train_ranks(text, 60))  # V = 317 > 256
    dc = DataConfig(data_path=str(tmp_path / "t.txt"), tokenizer="gpt2", bpe_encoding=str(ranks),
                    block_size=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    train.train(TrainRunConfig(
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, think_steps=1), data=dc,
        train=TrainConfig(max_steps=3, warmup_iters=1, eval_interval=1000, eval_iters=1,
                          save_interval=0, device="cpu"), out_dir=str(tmp_path / "out_ebt")))
    monkeypatch.chdir(tmp_path)
    tok = tokenizer_from_meta(load_checkpoint("out_ebt/final.pt")["meta"])
    base = ["--checkpoint=out_ebt/final.pt", "device=cpu", *VIZ_SMALL, "steps=2",
            "prompt=The future of AI is", "batch_size=2"]
    top = viz.run(viz_cfg(base + ["mode=topk", "topk=5"]))
    assert top["scope"] == "all 317 tokens" and len(top["ids"]) == 5
    word = next(i for i in range(256, 316) if tok.decode([i]).isalpha())  # a merged token
    assert viz.P.token_label(tok, word) == tok.decode([word]) and len(tok.decode([word])) >= 2
    ev = viz.run(viz_cfg(base + ["mode=eval"]))
    assert "bpt" in ev and ev["loss"][0] == pytest.approx(ev["loss_s1"])
    m = viz.run(viz_cfg(base + ["mode=margin"]))
    assert m["n_compared"] == 255  # V > 256: the true token and 255 random others
    for mode in ("surface3d", "per_token"):
        for p in viz.run(viz_cfg(base + [f"mode={mode}", "tokens=1"]))["files"]:
            assert_picture(p)
