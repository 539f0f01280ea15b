"""BPE data path without internet: a small byte-level BPE (trained here on Shakespeare and
written as a .tiktoken rank file, or registered in-process as tiktoken's "gpt2"), generated
parquet shards, the token cache, val split rules, DDP slices, checkpoint meta, seed commands."""
from __future__ import annotations

import base64
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

import nanoebm.data as D
import nanoebm.tokenizer as Tk
from nanoebm.config import DataConfig
from tests.conftest import REPO, SMALL, compose

TEXT = (REPO / "shakespeare.txt").read_text()
LINES = TEXT.splitlines()


def train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Naive BPE training: 256 byte tokens, then the most frequent adjacent pair, n times."""
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(seqs[w], seqs[w][1:]):
                pairs[a, b] += c
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w, s in seqs.items():
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return ranks


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def ranks():
    return train_ranks(TEXT[:20000], 60)


@pytest.fixture(scope="module")
def rank_file(ranks, tmp_path_factory):
    return write_ranks(tmp_path_factory.mktemp("enc") / "small.tiktoken", ranks)


def write_shards(folder: Path, n: int, docs: int = 40, lines: int = 12, seed: int = 0) -> list:
    """n parquet shards of `docs` Shakespeare excerpts each; returns the docs per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(seed), []
    for s in range(n):
        starts = rng.integers(0, len(LINES) - lines, docs)
        texts = ["\n".join(LINES[i:i + lines]) for i in starts]
        pq.write_table(pa.table({"text": texts}), folder / f"shard_{s:05d}.parquet", row_group_size=16)
        out.append(texts)
    return out


def reference_tokens(enc, shard_docs) -> np.ndarray:
    """What the cache must hold: EOT + encode(doc) for every document, in order."""
    return np.array([t for docs in shard_docs for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)])


def count_encodes(monkeypatch) -> list:
    calls = []
    real = D.encode_texts
    monkeypatch.setattr(D, "encode_texts", lambda *a: calls.append(1) or real(*a))
    return calls


# ------------------------------------------------------------------------------- encoding
def test_rank_file_tokenizer_meta_and_mismatch(rank_file, ranks, tmp_path):
    tok = Tk.load_bpe(str(rank_file))
    assert tok.vocab_size == len(ranks) + 1 and tok.eot == len(ranks)  # EOT after the ranks
    s = "ROMEO: what <|endoftext|> light"
    assert tok.decode(tok.encode(s)) == s and tok.eot not in tok.encode(s)  # typed EOT = text
    assert len(tok.encode(TEXT[:2000])) < 2000  # merges do merge
    meta = tok.meta
    assert meta["encoding"] == str(rank_file) and len(meta["sha256"]) == 64
    assert Tk.tokenizer_from_meta(meta).encode(s) == tok.encode(s)
    copy = write_ranks(tmp_path / "moved.tiktoken", ranks)  # same content elsewhere: accepted
    assert Tk.tokenizer_from_meta(meta, bpe_encoding=str(copy)).sha256 == meta["sha256"]
    swapped = dict(ranks)
    (a, ra), (b, rb) = list(ranks.items())[-2:]
    swapped[a], swapped[b] = rb, ra
    edited = write_ranks(tmp_path / "edited.tiktoken", swapped)
    with pytest.raises(ValueError, match="not the one the checkpoint was trained with"):
        Tk.tokenizer_from_meta(meta, bpe_encoding=str(edited))
    write_ranks(copy, swapped)  # edited in place: re-read, not served from a path cache
    with pytest.raises(ValueError, match="sha256"):
        Tk.tokenizer_from_meta(meta, bpe_encoding=str(copy))
    with pytest.raises(FileNotFoundError, match="rank file not found"):
        Tk.load_bpe(str(tmp_path / "nope.tiktoken"))
    with pytest.raises(FileNotFoundError, match="checkpoint's encoding"):  # moved/deleted
        Tk.tokenizer_from_meta({**meta, "encoding": str(tmp_path / "gone.tiktoken")})


def test_named_encoding_hash_is_content_and_offline_error(ranks, rank_file, monkeypatch):
    from tiktoken_ext.openai_public import r50k_pat_str
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={Tk.EOT: len(ranks)})
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "gpt2", enc)
    named = Tk.load_bpe("gpt2")
    assert named.meta["encoding"] == "gpt2"
    assert named.sha256 == Tk.load_bpe(str(rank_file)).sha256  # same vocabulary, same hash
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2")

    def offline(name):
        import requests
        raise requests.exceptions.ConnectionError("Failed to resolve openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError) as e:
        Tk.load_bpe("gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "data.bpe_encoding=" in msg and "r50k_base.tiktoken" in msg
    with pytest.raises(ValueError, match="not a tiktoken encoding"):
        Tk.load_bpe("gpt3")


# ---------------------------------------------------------------------------------- cache
def test_cache_built_once_reused_and_invalidated(rank_file, tmp_path, monkeypatch):
    shard_docs = write_shards(tmp_path / "fw", 3)
    tok = Tk.load_bpe(str(rank_file))
    calls = count_encodes(monkeypatch)
    cfg = DataConfig(data_path=str(tmp_path / "fw"), tokenizer="gpt2", bpe_encoding=str(rank_file),
                     block_size=16)
    data = D.load_data(cfg)
    n_first = len(calls)
    assert n_first > 0 and data.bits_name == "bpt" and data.train.dtype == np.uint16
    ref = reference_tokens(tok.enc, shard_docs)
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ref)
    np.testing.assert_array_equal(data.val, reference_tokens(tok.enc, shard_docs[2:]))  # last shard
    (cache,) = (tmp_path / "fw").glob("*.tokcache")
    assert (cache / "tokens.bin").stat().st_size == 2 * len(ref)  # uint16 on disk
    assert json.loads((cache / "meta.json").read_text())["n_tokens"] == len(ref)
    t0 = time.perf_counter()
    again = D.load_data(cfg)
    assert time.perf_counter() - t0 < 1.0 and len(calls) == n_first  # no re-tokenising
    assert isinstance(again.train, np.memmap)
    np.testing.assert_array_equal(again.val, data.val)
    two = D.load_data(DataConfig(**{**cfg.__dict__, "max_shards": 2}))  # new shard set: new cache
    assert len(calls) > n_first and len(list((tmp_path / "fw").glob("*.tokcache"))) == 2
    np.testing.assert_array_equal(two.val, reference_tokens(tok.enc, shard_docs[1:2]))
    n_two = len(calls)
    write_shards(tmp_path / "fw", 2, seed=5)  # shard contents change: rebuilt again
    D.load_data(DataConfig(**{**cfg.__dict__, "max_shards": 2}))
    assert len(calls) > n_two
    n_three, val = len(calls), np.array(data.val)
    del data, again  # no access to a mapping of a file that is cut short (SIGBUS)
    with open(cache / "tokens.bin", "r+b") as f:  # a damaged cache (e.g. disk full) is rebuilt
        f.truncate(100)
    np.testing.assert_array_equal(D.load_data(cfg).val, val)
    assert len(calls) > n_three


def test_uint32_cache_for_large_vocab(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):  # every byte pair: 65,792 tokens, more than uint16 holds
        for b in range(256):
            ranks[bytes([a, b])] = len(ranks)
    path = write_ranks(tmp_path / "big.tiktoken", ranks)
    shard_docs = write_shards(tmp_path / "fw", 2, docs=5)
    data = D.load_data(DataConfig(data_path=str(tmp_path / "fw"), tokenizer="gpt2",
                                  bpe_encoding=str(path), block_size=8))
    assert data.train.dtype == np.uint32 and data.vocab_size == 65793
    ref = reference_tokens(Tk.load_bpe(str(path)).enc, shard_docs)
    assert ref.max() > 65535  # ids that a uint16 cache would corrupt
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ref)


def test_text_file_streams_in_chunks_exactly(rank_file, tmp_path, monkeypatch):
    text = TEXT[:30000] + "\n\n\n   spaced  \n\n" + TEXT[30000:40000]
    f = tmp_path / "t.txt"
    f.write_text(text)
    chunks = list(D.text_chunks(f, size=997))
    assert len(chunks) > 20 and "".join(chunks) == text
    tok = Tk.load_bpe(str(rank_file))
    real = D.text_chunks
    monkeypatch.setattr(D, "text_chunks", lambda p: real(p, size=997))
    data = D.load_data(DataConfig(data_path=str(f), tokenizer="gpt2", bpe_encoding=str(rank_file),
                                  block_size=16))
    ref = tok.enc.encode_ordinary(text)  # one document: no EOT; chunking changes nothing
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ref)
    assert len(data.val) == int(np.ceil(0.1 * len(ref)))  # text files: last 10% by default


def test_val_split_rules_and_path_errors(rank_file, tmp_path, monkeypatch):
    write_shards(tmp_path / "one", 1)
    base = dict(data_path=str(tmp_path / "one"), tokenizer="gpt2", bpe_encoding=str(rank_file),
                block_size=16)
    with pytest.raises(ValueError, match="data.val_fraction"):  # never val = train
        D.load_data(DataConfig(**base))
    data = D.load_data(DataConfig(**base, val_fraction=0.2))
    n = len(data.train) + len(data.val)
    assert len(data.val) == int(np.ceil(0.2 * n))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download_data.py"):
        D.load_data(DataConfig(**{**base, "data_path": "~/data/openfineweb"}))
    write_shards(tmp_path / "data" / "openfineweb", 2)  # ~ expands to $HOME
    assert len(D.load_data(DataConfig(**{**base, "data_path": "~/data/openfineweb"})).val) > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet shards"):
        D.load_data(DataConfig(**{**base, "data_path": str(tmp_path / "empty")}))
    with pytest.raises(ValueError, match="max_shards applies to a folder"):
        D.load_data(DataConfig(data_path=str(REPO / "shakespeare.txt"), max_shards=2))
    with pytest.raises(ValueError, match="use char or gpt2"):
        D.load_data(DataConfig(tokenizer="bpe"))
    cache_dir = tmp_path / "caches"  # data.cache_dir moves the cache out of the data folder
    D.load_data(DataConfig(**base, val_fraction=0.3, cache_dir=str(cache_dir)))
    assert len(list(cache_dir.glob("*.tokcache"))) == 1


def test_char_tokenizer_over_parquet(tmp_path):
    shard_docs = write_shards(tmp_path / "fw", 2, docs=10)
    data = D.load_data(DataConfig(data_path=str(tmp_path / "fw"), tokenizer="char", block_size=16))
    assert data.bits_name == "bpb" and data.meta["tokenizer"] == "char"
    assert data.tokenizer.chars == sorted(set("".join(d for s in shard_docs for d in s)) | {"\n"})
    assert data.tokenizer.decode(data.val) == "".join("\n" + d for d in shard_docs[1])


def test_ddp_ranks_split_one_global_batch(rank_file, tmp_path):
    write_shards(tmp_path / "fw", 3)
    cfg = DataConfig(data_path=str(tmp_path / "fw"), tokenizer="gpt2", bpe_encoding=str(rank_file),
                     block_size=16)
    full = D.load_data(cfg)
    parts = [D.load_data(cfg, rank=r, world=3) for r in range(3)]
    np.testing.assert_array_equal(parts[2].val, full.val)  # everyone evaluates on the same val
    one = full.get_batch("train", 12, 16, torch.Generator().manual_seed(5))  # one process, B=12
    rows = [p.get_batch("train", 4, 16, torch.Generator().manual_seed(5), rank=r, world=3)
            for r, p in enumerate(parts)]  # three ranks, B=4 each
    for i in (0, 1):
        assert torch.equal(torch.cat([r[i] for r in rows]), one[i])


def test_ddp_other_local_ranks_wait_for_rank0_cache(rank_file, tmp_path, monkeypatch):
    import threading
    write_shards(tmp_path / "fw", 2)
    cfg = DataConfig(data_path=str(tmp_path / "fw"), tokenizer="gpt2", bpe_encoding=str(rank_file),
                     block_size=16)
    monkeypatch.setenv("LOCAL_RANK", "1")
    got = {}
    waiter = threading.Thread(target=lambda: got.update(r1=D.load_data(cfg, rank=1, world=2)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not list((tmp_path / "fw").glob("*.tokcache*"))  # not building
    monkeypatch.setenv("LOCAL_RANK", "0")
    r0 = D.load_data(cfg, rank=0, world=2)  # local rank 0 builds; rank 1 then maps the same file
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    np.testing.assert_array_equal(r0.train, got["r1"].train)
    np.testing.assert_array_equal(r0.train, D.load_data(cfg).train)


@pytest.mark.slow
def test_memory_flat_as_shards_grow(rank_file, tmp_path):
    """Building the cache for 2 vs 8 shards (4x the tokens) in fresh processes: the peak of
    Python + numpy allocations (tracemalloc, exact) and the peak RSS (kernel VmHWM, reset after
    the imports; noisy by a few MB from the allocators) must not grow with the corpus."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    write_shards(tmp_path / "fw", 8, docs=600, lines=40)
    probe = (
        "import json, sys, tracemalloc\n"
        "from nanoebm.config import DataConfig\nfrom nanoebm.data import load_data\n"
        "def hwm():\n"
        "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS\n"
        "before = hwm()\n"
        "tracemalloc.start()\n"
        f"d = load_data(DataConfig(data_path={str(tmp_path / 'fw')!r}, tokenizer='gpt2', "
        f"bpe_encoding={str(rank_file)!r}, max_shards=int(sys.argv[1]), block_size=16))\n"
        "print(json.dumps([tracemalloc.get_traced_memory()[1], hwm() - before, len(d.train) + len(d.val)]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {k: subprocess.Popen([sys.executable, "-c", probe, str(k)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env) for k in (2, 8)}
    # per k: (peak traced bytes, peak RSS growth in bytes, tokens)
    res = {k: json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for k, p in procs.items()}
    (heap2, rss2, tok2), (heap8, rss8, tok8) = res[2], res[8]
    assert tok8 > 3.5 * tok2 > 3_000_000
    extra = tok8 - tok2  # 2.8M tokens: kept in RAM they would cost 36 B each as a Python list
    assert heap8 - heap2 < 0.1 * extra, res  # (the old loader), 8 as int64, 2 even as uint16
    assert heap8 < 32e6, res  # bounded by one batch of documents, not by the corpus
    assert rss8 - rss2 < 12 * extra, res  # looser: allocator noise and file-backed memmap pages


# -------------------------------------------------------------------- training end to end
TINY = [*SMALL, "train.device=cpu"]


@pytest.mark.slow
def test_train_bpe_end_to_end(rank_file, tmp_path, monkeypatch):
    import sample as sample_script
    from nanoebm.checkpoint import load_checkpoint
    from sample import SampleConfig
    from train import train
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_shards(tmp_path / "fw", 3)
    calls = count_encodes(monkeypatch)
    args = [f"data.data_path={tmp_path / 'fw'}", "data.tokenizer=gpt2",
            f"data.bpe_encoding={rank_file}", f"out_dir={tmp_path / 'out'}", *TINY,
            "model.think_steps=1"]
    summary = train(compose(*args))
    assert "val_bpt" in summary and np.isfinite(summary["val_bpt"])
    rows = [json.loads(r) for r in (summary["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert "bpt" in train_rows[0] and train_rows[-1]["tokens"] == 2 * 2 * 16  # steps * B * T
    ckpt = load_checkpoint(summary["run_dir"] / "final.pt")
    tok = Tk.load_bpe(str(rank_file))
    assert ckpt["meta"] == tok.meta  # path + sha256 of the encoding
    prompt = "ROMEO: the king"
    assert Tk.tokenizer_from_meta(ckpt["meta"]).encode(prompt) == tok.enc.encode_ordinary(prompt)
    (res,) = sample_script.sample(SampleConfig(checkpoint=str(summary["run_dir"] / "final.pt"),
                                               prompt=prompt, max_new_tokens=4, device="cpu"))
    assert res["text"] == tok.decode(tok.encode(prompt) + res["tokens"])  # same encoding
    assert res["text"].startswith(prompt) and len(res["tokens"]) == 4
    n_built = len(calls)
    train(compose(*args, "train.max_steps=0"))  # a second run: start-up + one eval
    assert len(calls) == n_built, "second run re-tokenised"  # the cache was reused


@pytest.mark.parametrize("seed_cmd", [
    "data.data_path=~/data/openfineweb data.tokenizer=gpt2 data.max_shards=10 model.mcmc_num_steps=0 train.eval_interval=1000 train.eval_iters=50 train.max_steps=20000",
    "data.data_path=~/data/openfineweb data.tokenizer=gpt2 data.max_shards=10 model.mcmc_num_steps=2 model.truncate_mcmc=True model.no_mcmc_detach=False train.max_steps=20000",
    pytest.param("data.data_path=~/data/openfineweb data.tokenizer=gpt2 data.max_shards=10 "
                 "wandb_project=nanoebm wandb_name=ofw_baseline_k0",
                 marks=pytest.mark.slow),  # starting W&B (offline) alone takes seconds
])
def test_seed_commands_with_fixture_shards(seed_cmd, ranks, tmp_path, monkeypatch):
    """The README's FineWeb commands verbatim, HOME holding fixture shards and "gpt2" being the
    small in-process encoding (tiktoken's own registry, as after a first online run)."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from train import train
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HOME", str(tmp_path))
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={Tk.EOT: len(ranks)})
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "gpt2", enc)
    write_shards(tmp_path / "data" / "openfineweb", 3)
    summary = train(compose(*seed_cmd.split(), *TINY, f"out_dir={tmp_path / 'out'}"))
    assert summary["step"] == 2 and "val_bpt" in summary


@pytest.mark.slow
def test_seed_command_fails_clearly_without_data_or_encoding(tmp_path):
    """Real subprocesses (run side by side): no ~/data/openfineweb; shards but no way to get gpt2."""
    cmd = [sys.executable, str(REPO / "train.py"), "data.data_path=~/data/openfineweb",
           "data.tokenizer=gpt2", "data.max_shards=10", *TINY]
    procs = []
    for name, with_data in (("nodata", False), ("noenc", True)):
        home = tmp_path / name
        if with_data:
            write_shards(home / "data" / "openfineweb", 2)
        env = {**os.environ, "HOME": str(home), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
               "TIKTOKEN_CACHE_DIR": str(home / "tk"),  # nothing cached
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # offline
        procs.append(subprocess.Popen(cmd + [f"out_dir={home / 'out'}"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    (out1, err1), (out2, err2) = (p.communicate(timeout=180) for p in procs)
    for p, err in zip(procs, (err1, err2)):
        assert p.returncode != 0 and "Traceback" not in err, err
    last1, last2 = err1.strip().splitlines()[-1], err2.strip().splitlines()[-1]
    assert last1.startswith("error: data file not found: ") and "download_data.py" in last1
    assert str(tmp_path / "nodata" / "data" / "openfineweb") in last1  # ~ was expanded
    assert last2.startswith("error: tiktoken encoding 'gpt2' is unavailable")
    assert "data.bpe_encoding=" in last2


def test_presets_match_seed_commands():
    seed = compose("data.data_path=~/data/openfineweb", "data.tokenizer=gpt2",
                   "data.max_shards=10").data
    assert compose("data=fineweb_edu").data == seed
    exp = compose("experiment=fineweb_gpt2")
    assert (exp.train.eval_interval, exp.train.eval_iters) == (1000, 50)
    # the preset trains the same 64 windows per step as 2 accumulated micro-batches (memory)
    assert exp.data == dataclasses.replace(seed, batch_size=32) and exp.train.grad_accum_steps == 2
