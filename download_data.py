"""Download FineWeb-Edu-100B shuffled parquet shards (karpathy/fineweb-edu-100b-shuffle).

    python download_data.py -n 10 -w 4                 # shards 0..9 into ~/data/openfineweb
    python download_data.py -n -1 -w 8 -d /data/fw     # all 1823 shards
    python download_data.py -n 2 --base-url http://127.0.0.1:8000   # a mirror

It needs only the Python standard library, so any `python3` runs it, inside the venv or not.
Each finished shard gets one line (ok / skipped / failed with the reason); on a terminal a
status line below them shows the running shards' percentages and the overall rate.

Each shard is skipped when it is already a readable parquet file. Otherwise it is streamed to
`NAME.part` (resumed with an HTTP Range request after an interruption), retried with
exponential backoff, checked (complete, parquet footer readable, has a `text` column) and only
then renamed to NAME: a final name always holds a whole shard, whatever stops the process.
The output folder is created when the first shard starts to arrive, and removed again at the
end if this run created it and left it empty (every shard failed).
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
N_SHARDS = 1823                  # shard_00000 .. shard_01822
CHUNK = 1 << 20                  # bytes per read / progress report
TIMEOUT = 60                     # seconds without data before a connection counts as dropped


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.parquet"


def parquet_footer(path: Path) -> None:
    """A parquet file is `PAR1 <data> <footer> <footer length, 4 bytes> PAR1`: a download cut
    short loses the trailing `PAR1`, and a wrong length points outside the file."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(4)
        f.seek(max(size - 8, 0))
        tail = f.read(8)
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1" or int.from_bytes(tail[:4], "little") > size - 12:
        raise ValueError("no PAR1 footer at the end: cut short or not parquet")


def parquet_problem(path: Path) -> str | None:
    """None if `path` is a complete parquet file with a `text` column, else what is wrong. The
    footer check needs only the standard library; the schema is read with pyarrow where it is
    installed (uv run), and otherwise checked by the loader when it first reads the shard."""
    try:
        parquet_footer(path)
    except ValueError as e:
        return f"not a readable parquet file ({e})"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - a damaged footer, not parquet, ...
        return f"not a readable parquet file ({type(e).__name__})"
    return None if "text" in names else f"no `text` column (has {names})"


_progress = None  # per-worker queue for (shard, new bytes, bytes so far, total), see _init_worker


def _init_worker(progress) -> None:
    global _progress
    _progress = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool


def download_to(url: str, part: Path, i: int = -1) -> None:
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
        # The folder appears only now that a shard is arriving: a run whose every request
        # fails leaves nothing behind (several workers may race here; exist_ok settles it).
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read1(CHUNK):  # whatever has arrived, up to CHUNK
                f.write(chunk)
                have += len(chunk)
                if _progress is not None:
                    _progress.put((i, len(chunk), have, expected))
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
            download_to(url, part, i)
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
            return i, "ok", f"{final.stat().st_size / 1e6:,.1f} MB"
        part.unlink()
        err = f"downloaded file is {problem}"
    return i, "failed", err


def percent(have: int, total: int | None) -> str:
    """A running shard's share as text. It stops at 99%: the last bytes still have to pass
    the parquet check, and a shard that passes is reported as "ok" rather than as 100%."""
    if not total:
        return f"{have / 1e6:,.1f} MB"
    return f"{min(99, 100 * have // total)}%"


class Progress:
    """One plain line per finished shard; on a terminal also a status line redrawn in place
    (a carriage return, no terminal library), so logs and pipes get only the plain lines."""

    def __init__(self, n: int, stream=sys.stderr):
        self.n, self.stream, self.tty = n, stream, stream.isatty()
        self.running = {}            # shard -> (bytes so far, total or None)
        self.finished = set()
        self.count = {"ok": 0, "skipped": 0, "failed": 0}
        self.nbytes, self.t0, self.drawn = 0, time.time(), 0.0

    def update(self, i: int, new: int, have: int, total: int | None) -> None:
        self.nbytes += new
        if i not in self.finished:  # a late report from a shard that has already ended
            self.running[i] = (have, total)

    def result(self, i: int, status: str, detail: str) -> None:
        self.running.pop(i, None)
        self.finished.add(i)
        self.count[status] += 1
        done = sum(self.count.values())
        note = f": {detail}" if status == "failed" else f" ({detail})" if detail else ""
        self.write(f"[{done:>{len(str(self.n))}}/{self.n}] {status:<7} {shard_name(i)}{note}")

    def rate(self) -> str:
        mb = self.nbytes / 1e6
        return f"{mb:,.1f} MB at {mb / max(time.time() - self.t0, 1e-9):.1f} MB/s"

    def draw(self, force: bool = False) -> None:
        if not self.tty or (not force and time.time() - self.drawn < 0.1):
            return
        good = self.count["ok"] + self.count["skipped"]  # failed shards never count as progress
        line = (f"{100 * good // self.n}% {good}/{self.n} shards, {self.count['failed']} failed, "
                f"{self.rate()} | " + " ".join(f"#{i} {percent(*v)}" for i, v in
                                               sorted(self.running.items())))
        width = (shutil.get_terminal_size().columns or 80) - 1
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()
        self.drawn = time.time()

    def write(self, line: str) -> None:
        """A permanent line: printed over the status line, which is then redrawn below it."""
        self.clear()
        print(line, file=self.stream, flush=True)
        self.draw(force=True)

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * ((shutil.get_terminal_size().columns or 80) - 1) + "\r")
            self.stream.flush()


def drain(reports, progress: Progress, timeout: float) -> None:
    """Pass every byte report waiting in the queue to `progress` (waiting up to `timeout`)."""
    try:
        report = reports.get(timeout=timeout) if timeout else reports.get_nowait()
        while True:
            progress.update(*report)
            report = reports.get_nowait()
    except queue.Empty:
        pass


def download_all(jobs: list, workers: int, start_method, progress: Progress) -> dict:
    """Run `fetch` over `jobs` in a process pool; returns {shard: (status, detail)}."""
    ctx = mp.get_context(start_method)
    reports = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(reports,))
    results = {}
    try:
        pending = {job[0]: pool.apply_async(fetch, (job,)) for job in jobs}
        while pending:
            drain(reports, progress, timeout=0.2)
            for i in [i for i, r in pending.items() if r.ready()]:
                try:
                    _, status, detail = pending.pop(i).get()
                except Exception as e:  # noqa: BLE001 - e.g. a disk error: that shard failed
                    status, detail = "failed", f"{type(e).__name__}: {e}"
                results[i] = (status, detail)
                progress.result(i, status, detail)
            progress.draw()
    except KeyboardInterrupt:
        pool.terminate()  # workers die mid-write; only *.part files can be incomplete
        pool.join()
        raise
    pool.close()
    pool.join()
    drain(reports, progress, timeout=0)
    return results


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

    def error(message):  # one line instead of argparse's usage block; status 2 as argparse's
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    ap.error = error
    args = ap.parse_args(argv)
    if args.num_shards == 0 or args.num_shards < -1:
        error(f"-n must be -1 (all shards) or >= 1, got {args.num_shards}")
    if args.num_workers < 1:
        error(f"-w must be >= 1, got {args.num_workers}")
    if args.retries < 0:
        error(f"--retries must be >= 0, got {args.retries}")
    if urlparse(args.base_url).scheme not in ("http", "https", "file"):
        error(f"--base-url must start with http://, https:// or file://, got {args.base_url!r}")
    args.data_dir = Path(os.path.expanduser(args.data_dir)).resolve()  # workers get it as data
    ancestor = next(p for p in [args.data_dir, *args.data_dir.parents] if p.exists())
    if not ancestor.is_dir():
        error(f"-d {args.data_dir}: {ancestor} exists and is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        error(f"-d {args.data_dir}: no permission to write in {ancestor}")
    return args


def remove_empty_created(path: Path, existed: Path) -> None:
    """Remove `path` and its parents up to (not including) `existed` while they are empty:
    the folders this run created but never filled. rmdir refuses a folder that holds anything."""
    for p in [path, *path.parents]:
        if p == existed:
            return
        try:
            p.rmdir()
        except OSError:  # not empty (or already gone): keep it and everything above it
            return


def main(argv=None) -> int:
    args = parse_args(argv)
    n = N_SHARDS if args.num_shards == -1 else args.num_shards
    if n > N_SHARDS:
        print(f"note: the dataset has {N_SHARDS} shards; fetching all of them")
        n = N_SHARDS
    out = args.data_dir
    existed = next(p for p in [out, *out.parents] if p.exists())  # folders above it are not ours
    progress = Progress(n)
    workers = min(args.num_workers, n)
    progress.write(f"{n} shard(s) from {args.base_url} -> {out}, {workers} worker(s)")
    jobs = [(i, str(out), args.base_url, args.retries) for i in range(n)]
    try:
        results = download_all(jobs, workers, args.start_method, progress)
    except KeyboardInterrupt:
        progress.clear()
        remove_empty_created(out, existed)
        print("interrupted: partial shards are kept as *.part; rerun the same command to resume",
              file=sys.stderr)
        return 130
    progress.clear()
    remove_empty_created(out, existed)
    count = progress.count
    where = out if out.exists() else f"{out} (nothing written, not created)"
    print(f"{count['ok']} downloaded ({progress.rate()}), {count['skipped']} already complete, "
          f"{count['failed']} failed in {time.time() - progress.t0:.1f}s -> {where}")
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
