"""Data: a token stream per split and random (x, y) windows from it.

* `data.tokenizer=char`: vocabulary = the corpus' sorted characters, stored in the checkpoint.
* `data.tokenizer=gpt2`: tiktoken BPE; `data.bpe_encoding` is an encoding name (`gpt2`) or the
  path of a `.tiktoken` rank file (offline / custom vocabularies). Documents are EOT-separated.
* `data.data_path`: a UTF-8 text file, or a folder of parquet shards with a `text` column
  (FineWeb-Edu from download_data.py), the first `data.max_shards` of them in sorted order.

Large corpora are tokenised once, streaming (RAM does not grow with the corpus), into a token
cache (`tokens.bin`, uint16 when the vocabulary fits, and `meta.json`) inside the shard folder /
beside the text file or in `data.cache_dir`, and read back with np.memmap: later runs start in
well under a second. The cache key covers the tokenizer and every source file's name, size and
mtime, so changing shards, encoding or max_shards builds a new one.
Validation: the last shard (parquet), or the last `data.val_fraction` of the tokens (text files:
0.1 by default). Under DDP each rank keeps its rows of one shared global batch (get_batch).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoebm.config import DataConfig
from nanoebm.tokenizer import BPETokenizer, CharTokenizer, load_bpe, resolve_path

CACHE_VERSION = 1
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------- batches
@dataclass
class TokenData:
    train: np.ndarray          # 1-D token ids (an np.memmap for cached corpora)
    val: np.ndarray
    tokenizer: object
    bits_name: str             # "bpb" (bits per character) or "bpt" (bits per BPE token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def meta(self) -> dict:
        return self.tokenizer.meta

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator, device="cpu", rank: int = 0, world: int = 1):
        """Random windows: x = ids[i:i+T], y = ids[i+1:i+T+1], each (B, T) int64. Under DDP
        every rank draws the same global batch of world * B windows (same generator seed) and
        keeps rows rank*B..(rank+1)*B: N ranks compute exactly one process's world*B batch."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size - 1, (world * batch_size,), generator=generator)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]  # (B,) this rank's rows
        x = np.stack([data[i:i + block_size] for i in starts.tolist()]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + block_size] for i in starts.tolist()]).astype(np.int64)
        x, y = torch.from_numpy(x), torch.from_numpy(y)  # (B, T) each
        if torch.device(device).type == "cuda":  # async host->device copies
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        return x, y


def load_char_text(path: Path, val_fraction: float) -> TokenData:
    """Small text files, character level: read whole (no cache needed at this size)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it or pick another file") from None
    if not text:
        raise ValueError(f"data file is empty: {path}")
    tok = CharTokenizer(sorted(set(text)))
    ids = np.array(tok.encode(text), dtype=np.uint16 if tok.vocab_size < 2**16 else np.uint32)
    n_val = int(math.ceil(len(ids) * val_fraction))
    return TokenData(train=ids[:len(ids) - n_val], val=ids[len(ids) - n_val:], tokenizer=tok,
                     bits_name="bpb")


# --------------------------------------------------------------------------------- sources
def list_sources(path: Path, max_shards: int | None) -> list[Path]:
    """The text file, or the first max_shards `*.parquet` of a folder in sorted order."""
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))  # download_data.py's partial files are *.part
        if not shards:
            raise FileNotFoundError(f"no .parquet shards in {path}: fetch some with `python "
                                    f"download_data.py -n 10 -d {path}`")
        return shards if max_shards is None else shards[:max_shards]
    if path.is_file():
        if max_shards is not None:
            raise ValueError("data.max_shards applies to a folder of parquet shards, but "
                             f"data.data_path={path} is a file: drop data.max_shards")
        return [path]
    raise FileNotFoundError(f"data file not found: {path} (data.data_path takes a UTF-8 text file "
                            "or a folder of .parquet shards; for FineWeb-Edu, `python "
                            "download_data.py -n 10` fills ~/data/openfineweb; the task presets' "
                            "files come from `uv run python -m lab.tasks`)")


def text_chunks(path: Path, size: int = 1 << 22):
    """Stream a text file in ~size-char pieces, each cut after a newline that sits between two
    non-space characters: no BPE pre-token spans such a cut, so chunked == whole-file encoding."""
    buf = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(size):
            buf += block
            cut = safe_cut(buf)
            if cut:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


def safe_cut(s: str) -> int:
    """Index just after the last "\n" with non-space on both sides (0 if none)."""
    end = len(s) - 1  # the character after the newline must be in s
    while (i := s.rfind("\n", 1, end)) > 0:
        if not s[i - 1].isspace() and not s[i + 1].isspace():
            return i + 1
        end = i
    return 0


def iter_texts(src: Path, rows: int = 256):
    """Yield (texts, is_docs): lists of parquet documents, or chunks of one text file."""
    if src.suffix != ".parquet":
        try:
            for chunk in text_chunks(src):
                yield [chunk], False
        except UnicodeDecodeError as e:
            raise ValueError(f"{src} is not UTF-8 text ({e}); convert it") from None
        return
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(src)
    except Exception as e:  # noqa: BLE001 - truncated download, not parquet, ...
        raise ValueError(f"{src} is not a readable parquet file ({type(e).__name__}): delete it "
                         "and rerun download_data.py") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{src} has no `text` column (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(batch_size=rows, columns=["text"]):
        yield [t for t in batch.column(0).to_pylist() if t], True


# ----------------------------------------------------------------------------- token cache
def cache_location(cfg: DataConfig, path: Path, sources: list[Path], label: str) -> Path:
    """<folder>/<name>-<label>-<key>.tokcache, key = hash of tokenizer id + every source's
    name, size and mtime (so new/changed shards, max_shards or encoding mean a new cache)."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, label, stats]).encode()).hexdigest()[:16]
    root = resolve_path(cfg.cache_dir) if cfg.cache_dir else (path if path.is_dir() else path.parent)
    tag = re.sub(r"[^\w.]+", "_", label.split(":")[0])[:40]
    return root / f"{path.name}-{tag}-{key}.tokcache"


def char_vocab(sources: list[Path]) -> list[str]:
    """First pass of char tokenisation over parquet: the set of characters (+ the separator)."""
    chars = {"\n"}
    for src in sources:
        for texts, _ in iter_texts(src):
            for t in texts:
                chars.update(t)
    return sorted(chars)


def encode_texts(tok, texts: list[str], is_docs: bool, pool: ThreadPoolExecutor,
                 dtype=np.uint32) -> np.ndarray:
    """Token ids of a batch. BPE docs are prefixed with EOT, char docs with a newline."""
    if isinstance(tok, BPETokenizer):  # tiktoken releases the GIL: threads run in parallel,
        k = max(1, -(-len(texts) // THREADS))  # one contiguous slice of the batch per thread
        enc = lambda ts: [tok.enc.encode_to_numpy(t, disallowed_special=()) for t in ts]  # noqa: E731
        arrs = [a for part in pool.map(enc, [texts[i:i + k] for i in range(0, len(texts), k)])
                for a in part]
        sep = np.array([tok.eot], dtype=np.uint32)
    else:
        table = np.array([ord(c) for c in tok.chars])  # sorted code points, position = id
        arrs = (np.searchsorted(table, np.frombuffer(t.encode("utf-32-le"), np.uint32)) for t in texts)
        sep = np.array([tok.stoi["\n"]], dtype=np.uint32)
    parts = [p for a in arrs for p in ((sep, a) if is_docs else (a,))]
    return np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.zeros(0, dtype)


def build_cache(out: Path, tok, sources: list[Path], verbose: bool) -> None:
    """Tokenise every source once, appending to tokens.bin; meta.json records the dtype and
    where each source starts. Written to a temp folder, renamed into place when complete."""
    from tqdm import tqdm
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ValueError(f"cannot write the token cache in {out.parent} ({e.strerror}): set "
                         "data.cache_dir=DIR to a writable folder") from None
    offsets, n, t0 = [], 0, time.time()
    try:
        with open(tmp / "tokens.bin", "wb") as f, ThreadPoolExecutor(THREADS) as pool, \
                tqdm(sources, desc="tokenising", unit="file", disable=not verbose) as bar:
            for src in bar:
                offsets.append(n)
                for texts, is_docs in iter_texts(src):
                    ids = encode_texts(tok, texts, is_docs, pool, dtype)  # (n_batch,)
                    ids.tofile(f)
                    n += len(ids)
                bar.set_postfix(tokens=f"{n / 1e6:.1f}M", tok_s=f"{n / (time.time() - t0):.3g}")
        if n == 0:
            raise ValueError(f"no text in {sources[0].parent}: the sources are empty")
        meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "n_tokens": n,
                "sources": [p.name for p in sources], "offsets": offsets, "tokenizer": tok.meta,
                "build_seconds": time.time() - t0}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (out / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        dt = time.time() - t0
        print(f"data: tokenised {n:,} tokens in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} tok/s) -> {out}")


def load_cached(cfg: DataConfig, path: Path, sources: list[Path], tok, rank_builds: bool,
                verbose: bool):
    """(tokens memmap, per-source start offsets, tokenizer), building the cache if needed.
    tok: the BPE tokenizer, or None for char (its vocabulary comes from the corpus)."""
    label = f"{Path(tok.source).stem}:{tok.sha256}" if tok else "char"
    out = cache_location(cfg, path, sources, label)
    if not (out / "meta.json").exists():
        if rank_builds:
            build_cache(out, tok or CharTokenizer(char_vocab(sources)), sources, verbose)
        while not (out / "meta.json").exists():  # DDP: local rank 0 builds, the others wait
            time.sleep(1.0)
    meta = json.loads((out / "meta.json").read_text())
    size = np.dtype(meta["dtype"]).itemsize * meta["n_tokens"]
    if (out / "tokens.bin").stat().st_size != size:  # damaged (e.g. disk full): rebuild it
        shutil.rmtree(out)
        return load_cached(cfg, path, sources, tok, rank_builds, verbose)
    tok = tok or CharTokenizer(meta["tokenizer"]["chars"])
    tokens = np.memmap(out / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    if verbose:
        print(f"data: {meta['n_tokens']:,} tokens from {len(sources)} file(s), cache {out}")
    return tokens, meta["offsets"], tok


# ------------------------------------------------------------------------------------ entry
def load_data(cfg: DataConfig, rank: int = 0, world: int = 1) -> TokenData:
    """Load the configured corpus and check it is long enough for data.block_size. Under DDP
    (world > 1) only local rank 0 builds a token cache; the rest wait and map it."""
    frac = cfg.val_fraction  # data.* values were checked when cfg was built (DataConfig)
    path = resolve_path(cfg.data_path)
    sources = list_sources(path, cfg.max_shards)
    parquet = path.is_dir()
    if cfg.tokenizer == "char" and not parquet:
        data = load_char_text(path, 0.1 if frac is None else frac)
    else:
        if parquet and frac is None and len(sources) < 2:
            raise ValueError(f"{path} gives one parquet shard and validation uses the last shard:"
                             " add shards (data.max_shards>=2) or set data.val_fraction=0.01 to "
                             "hold out the end of it")
        tok = load_bpe(cfg.bpe_encoding) if cfg.tokenizer == "gpt2" else None
        builds = world == 1 or os.environ.get("LOCAL_RANK", "0") == "0"
        tokens, offsets, tok = load_cached(cfg, path, sources, tok, builds, verbose=rank == 0)
        n = len(tokens)
        split = offsets[-1] if frac is None and parquet else n - int(math.ceil(n * (frac or 0.1)))
        data = TokenData(train=tokens[:split], val=tokens[split:], tokenizer=tok,
                         bits_name="bpt" if cfg.tokenizer == "gpt2" else "bpb")
    for split_name, arr in (("train", data.train), ("val", data.val)):
        if len(arr) < cfg.block_size + 2:
            raise ValueError(f"{split_name} split has {len(arr)} tokens, too short for "
                             f"data.block_size={cfg.block_size}: lower data.block_size or use "
                             "more data")
    return data


# ------------------------------------------------------------------------ the sampler's record
# Training windows come from one torch.Generator (train.py's data_gen): every micro-batch draws
# world * B window starts with torch.randint. So the generator's state at a run's start, the
# number of draws and their size determine every window the run saw. A checkpoint stores that
# as one segment per start or resume (its own `step` ends the last), and replaying the segments
# reproduces the starts bit for bit (lab/coverage.py), without one bit per training token.
def new_segment(gen: torch.Generator, step: int, accum: int, n: int, high: int, block: int) -> dict:
    """The record of the draws that start now, from gen's current state."""
    return {"state": gen.get_state().clone(), "start_step": int(step), "accum": int(accum),
            "n": int(n), "high": int(high), "block": int(block)}


def continue_record(record: list | None, step: int) -> list | None:
    """A resumed run's record: the checkpoint's segments up to its step (None: no record, e.g.
    a checkpoint from before records existed; the resumed run then has no exact record either)."""
    if record is None:
        return None
    return [s for s in record if s["start_step"] < step]
