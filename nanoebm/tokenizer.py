"""Tokenizers: characters (the corpus' sorted characters) and tiktoken BPE (an encoding name or
a `.tiktoken` rank file), each with the `meta` a checkpoint stores to rebuild it exactly."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def resolve_path(path: str) -> Path:
    """Expand ~ and env vars; a relative path missing from the cwd is tried at the repo root."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return p


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"text has characters outside the model's vocabulary: {unknown!r}; "
                             "remove them (the vocabulary is the training file's characters)")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    @property
    def meta(self) -> dict:
        return {"tokenizer": "char", "chars": self.chars}


# ------------------------------------------------------------------------------------ BPE
class BPETokenizer:
    """A tiktoken encoding plus where it came from (name or rank file) and a content hash."""

    def __init__(self, enc, source: str):
        self.enc, self.source = enc, source
        self.vocab_size = enc.n_vocab
        self.eot = enc.eot_token
        self.sha256 = encoding_sha256(enc)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" typed in a prompt is plain text

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    @property
    def meta(self) -> dict:
        return {"tokenizer": "bpe", "encoding": self.source, "sha256": self.sha256,
                "vocab_size": self.vocab_size}


def encoding_sha256(enc) -> str:
    """Hash of what defines the encoding (split regex, ranks, specials), not of its name, so a
    rank file and the named encoding it came from agree."""
    h = hashlib.sha256(enc._pat_str.encode())
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()


def read_rank_file(path: Path) -> dict[bytes, int]:
    """tiktoken's `.tiktoken` format: one `base64(token) rank` per line. Read here rather than
    with tiktoken.load_tiktoken_bpe, which caches by path and would miss an edited file."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path} line {n} is not `base64token rank`: not a .tiktoken "
                                 "rank file") from None
    if not ranks:
        raise ValueError(f"{path} is empty: not a .tiktoken rank file")
    return ranks


def load_bpe(spec: str) -> BPETokenizer:
    """`spec`: a tiktoken encoding name, or a `.tiktoken` rank file read with GPT-2's split
    regex and <|endoftext|> as the one special token, right after the ranks."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    if spec.endswith(".tiktoken") or os.sep in spec or spec.startswith("~"):
        path = resolve_path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"data.bpe_encoding rank file not found: {path} (give the "
                                    "path of a .tiktoken file, or an encoding name like gpt2)")
        ranks = read_rank_file(path)
        enc = tiktoken.Encoding(name=path.stem, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                special_tokens={EOT: max(ranks.values()) + 1})
        return BPETokenizer(enc, str(path))
    if spec not in tiktoken.list_encoding_names():
        raise ValueError(f"data.bpe_encoding={spec!r} is not a tiktoken encoding "
                         f"({', '.join(tiktoken.list_encoding_names())}) nor a .tiktoken file")
    try:
        enc = tiktoken.get_encoding(spec)
    except Exception as e:  # noqa: BLE001 - no network / proxy / corrupt download: one clear line
        raise ValueError(f"tiktoken encoding {spec!r} is unavailable ({type(e).__name__}: tiktoken "
                         "downloads it on first use and this machine could not); connect once, or "
                         f"download its rank file elsewhere (gpt2: {GPT2_RANKS_URL}, the same "
                         "vocabulary) and set data.bpe_encoding=/path/to/r50k_base.tiktoken") from None
    return BPETokenizer(enc, spec)


def tokenizer_from_meta(meta: dict, bpe_encoding: str | None = None):
    """Rebuild the tokenizer recorded in a checkpoint. `bpe_encoding` overrides where a BPE
    encoding is loaded from (e.g. the rank file moved); its content must still match."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(list(meta["chars"]))
    if kind == "bpe":
        try:
            tok = load_bpe(bpe_encoding or meta["encoding"])
        except FileNotFoundError:
            raise FileNotFoundError(f"BPE rank file {bpe_encoding or meta['encoding']} (the "
                                    "checkpoint's encoding) is missing: restore it or pass its "
                                    "new path") from None
        if tok.sha256 != meta["sha256"]:
            raise ValueError(f"BPE encoding {tok.source!r} (sha256 {tok.sha256[:12]}) is not the "
                             f"one the checkpoint was trained with ({meta['encoding']!r}, sha256 "
                             f"{meta['sha256'][:12]}): use that encoding / rank file")
        return tok
    raise ValueError(f"unknown tokenizer in checkpoint meta: {kind!r}")


def resolve_tokenizer(meta: dict | None, vocab_size: int, tokenizer: str | None = None,
                      bpe_encoding: str | None = None):
    """The checkpoint's own tokenizer (its meta). `bpe_encoding` may point a BPE checkpoint at a
    moved rank file (its content must match); a tokenizer of another kind, or one whose
    vocabulary size differs from the model's, is refused."""
    kind = (meta or {}).get("tokenizer")
    if tokenizer is not None and kind is not None and (tokenizer == "char") != (kind == "char"):
        raise ValueError(f"tokenizer={tokenizer}, but the checkpoint was trained with a {kind} "
                         "tokenizer: drop the override")
    if kind is not None:
        return tokenizer_from_meta(meta, bpe_encoding)
    if tokenizer is None and bpe_encoding is None:
        raise ValueError("the checkpoint records no tokenizer: pass tokenizer=gpt2 or bpe_encoding=")
    if tokenizer == "char":
        raise ValueError("tokenizer=char needs a char checkpoint (the vocabulary lives in it)")
    tok = load_bpe(bpe_encoding or (tokenizer if tokenizer not in ("gpt2", "bpe") else "gpt2"))
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer override has {tok.vocab_size} tokens but the model's "
                         f"vocabulary has {vocab_size}: use the encoding it was trained with")
    return tok
