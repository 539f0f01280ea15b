"""Download FineWeb-Edu-100B shuffled parquet shards (karpathy/fineweb-edu-100b-shuffle).

    python download_data.py -n 10 -w 4                 # shards 0..9 into ~/data/openfineweb
    python download_data.py -n -1 -w 8 -d /data/fw     # all 1823 shards
    python download_data.py -n 2 --base-url http://127.0.0.1:8000   # a mirror

Each shard is skipped when it is already a readable parquet file. Otherwise it is streamed to
`NAME.part` (resumed with an HTTP Range request after an interruption), retried with
exponential backoff, checked (complete, opens as parquet, has a `text` column) and only then
renamed to NAME: a final name always holds a whole shard, whatever stops the process.
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
N_SHARDS = 1823                  # shard_00000 .. shard_01822
CHUNK = 1 << 20                  # bytes per read / progress report
TIMEOUT = 60                     # seconds without data before a connection counts as dropped


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.parquet"


def parquet_problem(path: Path) -> str | None:
    """None if `path` opens as parquet with a `text` column, else what is wrong with it."""
    import pyarrow.parquet as pq
    try:
        names = pq.ParquetFile(path).schema_arrow.names  # reads the footer: truncation fails here
    except Exception as e:  # noqa: BLE001 - any unreadable file is just "bad"
        return f"not a readable parquet file ({type(e).__name__})"
    return None if "text" in names else f"no `text` column (has {names})"


_progress = None  # per-worker queue for byte counts, set by _init_worker


def _init_worker(progress) -> None:
    global _progress
    _progress = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool


def download_to(url: str, part: Path) -> None:
    """Append the rest of `url` to `part` (Range request when it already has bytes)."""
    have = part.stat().st_size if part.exists() else 0
    req = Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urlopen(req, timeout=TIMEOUT)
    except HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: `part` is checked as it is
            return
        raise
    with resp:
        start = 0  # a 200 reply is the whole file (the server ignored the Range)
        if resp.status == 206:  # "Content-Range: bytes START-END/TOTAL"
            start = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
        if start not in (0, have):
            raise OSError(f"server resumed at byte {start}, expected {have}")
        have = start  # 0: rewrite the .part from scratch
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read1(CHUNK):  # whatever has arrived, up to CHUNK
                f.write(chunk)
                if _progress is not None:
                    _progress.put(len(chunk))
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise OSError(f"connection dropped at byte {got} of {expected}")


def fetch(job: tuple) -> tuple[int, str, str]:
    """Download one shard; returns (index, "skipped" | "ok" | "failed", detail)."""
    i, out_dir, base_url, retries = job
    final = Path(out_dir) / shard_name(i)
    part = final.with_name(final.name + ".part")
    if final.exists():
        if parquet_problem(final) is None:
            return i, "skipped", ""
        final.unlink()  # truncated or corrupt: fetch it again
    url, err = f"{base_url.rstrip('/')}/{shard_name(i)}", ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 60.0))  # 1, 2, 4, ... s between attempts
        try:
            download_to(url, part)
        except HTTPError as e:
            err = f"HTTP {e.code} for {url}"
            if 400 <= e.code < 500 and e.code not in (408, 429):  # missing: retrying won't help
                break
            continue
        except (URLError, OSError, http.client.HTTPException) as e:
            err = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            continue  # keep the .part: the next attempt resumes it
        problem = parquet_problem(part)
        if problem is None:
            os.replace(part, final)  # atomic: the final name only ever holds a checked file
            return i, "ok", ""
        part.unlink()
        err = f"downloaded file is {problem}"
    return i, "failed", err


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--num-shards", type=int, default=10,
                    help=f"how many shards, from shard_00000 (-1 = all {N_SHARDS})")
    ap.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    ap.add_argument("-d", "--data-dir", default="~/data/openfineweb", help="output folder")
    ap.add_argument("--base-url", default=BASE_URL, help="fetch URL/shard_NNNNN.parquet (a mirror)")
    ap.add_argument("--retries", type=int, default=5, help="extra attempts per shard, with backoff")
    ap.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None,
                    help="multiprocessing start method (default: the platform's)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n = N_SHARDS if args.num_shards == -1 else args.num_shards
    if n < 1 or args.num_workers < 1 or args.retries < 0:
        raise SystemExit("error: -n must be -1 or >= 1, -w >= 1 and --retries >= 0")
    if n > N_SHARDS:
        print(f"note: the dataset has {N_SHARDS} shards; fetching all of them")
        n = N_SHARDS
    out = Path(os.path.expanduser(args.data_dir)).resolve()  # absolute: workers get it as data
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    ctx = mp.get_context(args.start_method)
    progress = ctx.Queue()
    jobs = [(i, str(out), args.base_url, args.retries) for i in range(n)]
    results, nbytes, t0 = {}, 0, time.time()
    pool = ctx.Pool(min(args.num_workers, n), initializer=_init_worker, initargs=(progress,))
    try:
        pending = [pool.apply_async(fetch, (job,)) for job in jobs]
        with tqdm(total=n, unit="shard", desc=f"-> {out}", file=sys.stderr) as bar:
            while pending:
                try:
                    nbytes += progress.get(timeout=0.2)
                except queue.Empty:
                    pass
                for r in [r for r in pending if r.ready()]:
                    i, status, detail = r.get()
                    results[i] = (status, detail)
                    pending.remove(r)
                    bar.update(1)
                rate = nbytes / 1e6 / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{nbytes / 1e6:,.0f} MB at {rate:.1f} MB/s", refresh=False)
    except KeyboardInterrupt:
        pool.terminate()  # workers die mid-write; only *.part files can be incomplete
        pool.join()
        print("interrupted: partial shards are kept as *.part; rerun the same command to resume",
              file=sys.stderr)
        return 130
    pool.close()
    pool.join()
    while not progress.empty():
        nbytes += progress.get()
    count = {s: sum(v[0] == s for v in results.values()) for s in ("ok", "skipped", "failed")}
    print(f"done in {time.time() - t0:.1f}s: {count['ok']} downloaded ({nbytes / 1e6:,.1f} MB), "
          f"{count['skipped']} already complete, {count['failed']} failed -> {out}")
    for i, (status, detail) in sorted(results.items()):
        if status == "failed":
            print(f"  failed {shard_name(i)}: {detail}")
    if count["failed"]:
        print(f"error: {count['failed']} shard(s) failed; rerun to retry (complete shards are "
              "skipped, partial ones resume)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
