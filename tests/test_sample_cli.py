"""sample.py end to end: every seed command, checkpoint selection and error messages, output."""
import dataclasses
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample as sample_script
from nanoebm.checkpoint import atomic_save, point_link
from nanoebm.config import ModelConfig
from sample import SampleConfig
from nanoebm.cli import rewrite_argv
from nanoebm.model import EBT
from nanoebm.tokenizer import CharTokenizer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
# the sample.py lines of seed-commands.md, verbatim (tests only append max_new_tokens)
SEED_LINES = """\
sample.py checkpoint=out_ebt/final.pt max_new_tokens=500 prompt="HAMLET:"
sample.py checkpoint=out_ebt/final.pt use_thinking=true think_steps=4 topk=64
sample.py checkpoint=out_ebt/final.pt use_thinking=true think_steps=4 topk=64 sample=true sample_temp=1.2 sample_top_p=0.9
sample.py checkpoint=out_ebt/final.pt use_thinking=false
sample.py checkpoint=out_ebt/final.pt max_new_tokens=256 prompt="The future of AI is"
sample.py checkpoint=out_ebt/final.pt use_thinking=true think_steps=4 topk=64 sample=true sample_temp=1.0 sample_top_p=0.95 prompt="In the year 2050,"
sample.py checkpoint=out_ebt/final.pt max_new_tokens=300 prompt="HAMLET:"
sample.py checkpoint=out_ebt/final.pt use_thinking=true think_steps=4 topk=64 prompt="ROMEO:"
sample.py
""".splitlines()
# a vocabulary with every character the seed prompts use (digits included)
TEXT = "\nHAMLET:ROMEO:The future of AI is In the year 2050, to be or not to be.\n"


def write_run(out_dir: Path, name: str, seed: int = 0, step: int = 7, **model_kw) -> Path:
    tok = CharTokenizer(sorted(set(TEXT)))
    torch.manual_seed(seed)
    mc = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size,
                     dropout=0.0, **model_kw)
    run = out_dir / name
    run.mkdir(parents=True)
    atomic_save({"model": EBT(mc).state_dict(), "optimizer": {}, "model_config": dataclasses.asdict(mc),
                 "config": {}, "meta": tok.meta, "step": step, "rng": []}, run / "final.pt")
    return run / "final.pt"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with out_ebt/run_*/final.pt and the out_ebt/final.pt link, as train.py leaves."""
    final = write_run(tmp_path / "out_ebt", "run_20250101_000000")
    point_link(tmp_path / "out_ebt" / "final.pt", final)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


def run_cli(argv, monkeypatch):
    """Run sample.py as __main__ in this process (argv shims, Hydra and all), like
    `python sample.py ARGS` minus the interpreter start-up."""
    monkeypatch.setattr(sys, "argv", [str(REPO / "sample.py"), *argv])
    runpy.run_path(str(REPO / "sample.py"), run_name="__main__")


@pytest.mark.parametrize("line", SEED_LINES, ids=[f"seed{i}" for i in range(len(SEED_LINES))])
def test_seed_command_runs(line, workdir, monkeypatch, capsys):
    run_cli(shlex.split(line)[1:] + ["max_new_tokens=6"], monkeypatch)
    out = capsys.readouterr().out
    assert "[sample 1/1] 6 tokens" in out
    prompt = next((a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("prompt=")), "\n")
    assert prompt in out  # the text starts with the prompt, commas and colons included
    assert ("mean energy drop per token" in out) == ("use_thinking=false" not in line)


@pytest.mark.slow
def test_cli_subprocess_key_value_and_latest(workdir):
    """A real process: --key=value, a prompt with a comma, no checkpoint (newest run)."""
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prompt=In the year 2050,",
                        "--max_new_tokens=4", "stream=false", "num_samples=2", "sample=true"],
                       capture_output=True, text=True, cwd=workdir, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    assert "run_20250101_000000/final.pt" in r.stdout
    assert r.stdout.count("In the year 2050,") == 2 and "[sample 2/2] 4 tokens" in r.stdout
    assert not (workdir / "outputs").exists()


def test_newest_checkpoint_is_newest_by_time_not_name(tmp_path, capsys):
    old = write_run(tmp_path, "run_20990101_000000", step=1)  # sorts last by name...
    new = write_run(tmp_path, "run_20000101_000000", step=2)
    os.utime(old, (1_000_000, 1_000_000))  # ...but is the older file
    os.utime(new, (2_000_000, 2_000_000))
    sample_script.sample(SampleConfig(out_dir=str(tmp_path), max_new_tokens=1, prompt="T"))
    assert capsys.readouterr().out.startswith(f"using {new} (step 2 of ?, written ")


def test_missing_and_corrupt_checkpoints_give_clear_errors(workdir, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"^error: checkpoint not found: nope\.pt"):
        run_cli(["checkpoint=nope.pt"], monkeypatch)
    (workdir / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^error: checkpoint bad\.pt is corrupt"):
        run_cli(["checkpoint=bad.pt"], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: prompt has characters outside .*\['Z'\]"):
        run_cli(["prompt=Zo"], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: sample_top_p must be in \(0, 1\]"):
        run_cli(["sample_top_p=1.5"], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: n_candidates=3: every chain starts"):
        run_cli(["n_candidates=3"], monkeypatch)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^error: device=cuda requested but CUDA is not"):
            run_cli(["device=cuda"], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: temperature is not an option; "):
        run_cli(["temperature=0.8"], monkeypatch)  # a typo is a one-line error, not ignored
    with pytest.raises(SystemExit, match=r"^error: sample_tmp is not an option; did you mean "
                                         r"sample_temp\?$"):
        run_cli(["sample_tmp=0.8"], monkeypatch)


def test_options_reach_the_output(workdir, capsys):
    cfg = SampleConfig(max_new_tokens=5, prompt="Zo to be", strict_prompt=False, stream=False)
    r = sample_script.sample(cfg)[0]
    out = capsys.readouterr().out
    assert "warning: dropped prompt characters outside the vocabulary: ['Z']" in out
    assert r["text"].startswith("o to be") and len(r["tokens"]) == 5
    assert r["mean_think_steps"] == 2.0 and "mean_energy_drop" in r
    r3 = sample_script.sample(dataclasses.replace(cfg, think_steps=3))[0]
    assert r3["mean_think_steps"] == 3.0
    s1 = sample_script.sample(dataclasses.replace(cfg, use_thinking=False))[0]
    assert s1["mean_think_steps"] == 0.0 and "mean_energy_drop" not in s1
    a, b = sample_script.sample(dataclasses.replace(cfg, sample=True, num_samples=2, seed=3))
    again = sample_script.sample(dataclasses.replace(cfg, sample=True, num_samples=2, seed=3))
    assert [a["tokens"], b["tokens"]] == [x["tokens"] for x in again]  # the seed reproduces
    assert a["tokens"] != b["tokens"]  # ...and the two samples differ
    best = sample_script.sample(dataclasses.replace(cfg, n_candidates=3, think_noise=0.5))[0]
    assert "best of 3" in capsys.readouterr().out and len(best["tokens"]) == 5
    nocache = sample_script.sample(dataclasses.replace(cfg, kv_cache=False))[0]
    assert nocache["tokens"] == r["tokens"]
    none = sample_script.sample(dataclasses.replace(cfg, max_new_tokens=0))[0]
    assert none["text"] == "o to be" and none["tokens"] == []


def test_model_without_s1_head_says_what_use_thinking_false_means(tmp_path, capsys):
    path = write_run(tmp_path, "run_x", think_init="noise", aux_ce_weight=0.0)
    sample_script.sample(SampleConfig(checkpoint=str(path), use_thinking=False, max_new_tokens=2,
                                      prompt="T"))
    assert "no System-1 head" in capsys.readouterr().out


def test_streaming_prints_as_tokens_come(capsys):
    class Bytes:  # a byte-level tokenizer whose tokens can split a UTF-8 character
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    p = sample_script.Printer(Bytes())
    seen = []
    for b in "aé!".encode():
        p(torch.tensor([b]))
        seen.append(capsys.readouterr().out)
    assert seen == ["a", "", "é", "!"]  # the half character waits for its second byte


def test_prompt_is_passed_verbatim():
    argv, _ = rewrite_argv(["prompt=a,b [c] ${x} it's \\", "--prompt='q'", "topk=3"], ("prompt",))
    assert argv == ["prompt='a,b [c] \\${x} it\\'s \\\\'", "prompt='q'", "topk=3"]


def test_num_samples_run_as_one_batch_and_compile_reaches_generate(workdir, monkeypatch, capsys):
    calls = []
    real = sample_script.generate
    monkeypatch.setattr(sample_script, "generate", lambda model, idx, *a, **kw:
                        calls.append((tuple(idx.shape), kw["compile"])) or real(model, idx, *a, **kw))
    cfg = SampleConfig(max_new_tokens=5, prompt="to be", stream=False, num_samples=3)
    greedy = sample_script.sample(cfg)
    assert calls == [((3, 5), False)]  # one generate call, one row per sample
    assert len({tuple(r["tokens"]) for r in greedy}) == 1  # argmax: the rows agree
    drawn = sample_script.sample(dataclasses.replace(cfg, sample=True, seed=3))
    assert len({tuple(r["tokens"]) for r in drawn}) > 1  # each row draws its own tokens
    out = capsys.readouterr().out
    assert "[sample 3/3] 5 tokens" in out and "tok/s per sample" in out
    # compile=true reaches the think step; a compiler that fails leaves one note, same tokens
    from nanoebm import think_at

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler")
        return run
    monkeypatch.setattr(think_at.torch, "compile", broken)
    comp = sample_script.sample(dataclasses.replace(cfg, num_samples=1, compile=True))
    assert calls[-1] == ((1, 5), True) and comp[0]["tokens"] == greedy[0]["tokens"]
    assert capsys.readouterr().out.count("note: torch.compile of the think step failed") == 1
