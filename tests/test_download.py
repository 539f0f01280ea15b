"""download_data.py against a local HTTP server (127.0.0.1) serving generated parquet shards.

The server supports Range requests and injects faults (slow bodies, dropped connections,
corrupt bodies, 404s, an error status for every request); it stops by itself after a minute
even if a test forgets it. The script itself needs only the standard library; pyarrow here
writes the shards and checks the script's own parquet footer reader.
"""
from __future__ import annotations

import io
import os
import pty
import random
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # a local HTTP server with injected delays and faults

REPO = Path(__file__).resolve().parent.parent


def shard_bytes(seed: int, n_docs: int = 40, doc_chars: int = 2000) -> bytes:
    """A parquet file with a `text` column of random (so barely compressible) documents."""
    rng = random.Random(seed)
    docs = ["".join(rng.choices(string.ascii_letters + "  \n", k=doc_chars)) for _ in range(n_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, compression="none")
    return buf.getvalue()


class ShardServer:
    """Serves `files` {name: bytes}. Per-name fault lists are consumed one per request:
    drop[name] = [byte count to cut the connection at, ...]; delay = seconds per 16 KiB;
    status = an HTTP error code answered to every request (None: serve normally)."""

    def __init__(self, files: dict, lifetime: float = 60.0):
        self.files, self.drop, self.delay, self.status = dict(files), {}, 0.0, None
        self.log = []                 # (name, range start, time) per GET
        self.active = self.max_active = 0
        lock, srv = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                with lock:
                    srv.log.append((name, start, time.time()))
                    srv.active += 1
                    srv.max_active = max(srv.max_active, srv.active)
                try:
                    self._send(name, start)
                finally:
                    with lock:
                        srv.active -= 1

            def _send(self, name, start):
                if srv.status is not None:
                    self.send_error(srv.status)
                    return
                if name not in srv.files:
                    self.send_error(404)
                    return
                data = srv.files[name]
                if start >= len(data) and start:
                    self.send_error(416)
                    return
                cut = srv.drop[name].pop(0) if srv.drop.get(name) else None
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:] if cut is None else data[start:cut]
                try:
                    for i in range(0, len(body), 1 << 14):
                        self.wfile.write(body[i:i + (1 << 14)])
                        time.sleep(srv.delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (interrupted download)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self.timer = threading.Timer(lifetime, self.close)  # bounded even if a test hangs
        self.timer.daemon = True
        self.timer.start()

    def gets(self, name):
        return [(s, t) for n, s, t in self.log if n == name]

    def close(self):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    files = {f"shard_{i:05d}.parquet": shard_bytes(i) for i in range(4)}
    srv = ShardServer(files)
    yield srv
    srv.close()


def run_dl(args, home, flags=(), **kw):
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, *flags, str(REPO / "download_data.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=60, **kw)


def test_parallel_download_then_skip(server, tmp_path):
    server.delay = 0.01  # slow enough that two workers overlap
    out = tmp_path / "out"
    r = run_dl(["-n", 4, "-w", 2, "-d", out, "--base-url", server.url], tmp_path)
    assert r.returncode == 0, r.stderr
    for name, data in server.files.items():
        assert (out / name).read_bytes() == data
    assert server.max_active >= 2  # really parallel
    assert not list(out.glob("*.part"))
    assert "4 downloaded" in r.stdout
    n_gets = len(server.log)
    r = run_dl(["-n", 4, "-w", 2, "-d", out, "--base-url", server.url], tmp_path)
    assert r.returncode == 0 and "4 already complete" in r.stdout
    assert len(server.log) == n_gets  # complete shards are not fetched again


def test_spawn_honours_data_dir(server, tmp_path):
    home, out = tmp_path / "home", tmp_path / "elsewhere"
    r = run_dl(["-n", 2, "-w", 2, "-d", out, "--base-url", server.url, "--start-method", "spawn"],
               home)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert not (home / "data").exists()  # spawned workers did not fall back to ~/data/openfineweb


def test_default_dir_is_home_data_openfineweb(server, tmp_path):
    r = run_dl(["-n", 1, "-w", 1, "--base-url", server.url], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "openfineweb" / "shard_00000.parquet").is_file()


def test_interrupt_then_resume_with_range(server, tmp_path):
    name = "shard_00000.parquet"
    server.files[name] = shard_bytes(0, n_docs=200)  # ~400 KB at 16 KiB per 200 ms: ~5 s
    server.delay = 0.2  # slow enough that Ctrl-C lands mid-file even on a loaded machine
    out = tmp_path / "out"
    env = {**os.environ, "HOME": str(tmp_path)}
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; pytest itself may run
    # as a background job (CI), whose children inherit SIGINT *ignored*, so restore the default.
    proc = subprocess.Popen([sys.executable, str(REPO / "download_data.py"), "-n", "1", "-w", "1",
                             "-d", str(out), "--base-url", server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    part = out / (name + ".part")
    deadline = time.time() + 30
    while time.time() < deadline and not (part.exists() and part.stat().st_size >= 16_384):
        time.sleep(0.02)
    assert part.exists() and proc.poll() is None, "the transfer ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C mid-file
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "resume" in err
    assert not (out / name).exists()  # no partial final file
    have = part.stat().st_size
    assert 0 < have < len(server.files[name])
    server.delay = 0.0
    r = run_dl(["-n", 1, "-w", 1, "-d", out, "--base-url", server.url], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / name).read_bytes() == server.files[name]
    assert server.gets(name)[-1][0] == have  # the rerun asked only for the missing bytes
    assert not part.exists()


def test_truncated_final_file_is_refetched(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    name = "shard_00001.parquet"
    (out / name).write_bytes(server.files[name][:3000])  # e.g. copied by hand, cut short
    r = run_dl(["-n", 2, "-d", out, "--base-url", server.url], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / name).read_bytes() == server.files[name]


def test_corrupt_body_fails_cleanly(server, tmp_path):
    name = "shard_00001.parquet"
    server.files[name] = b"PAR1" + os.urandom(5000)  # right size class, not parquet
    out = tmp_path / "out"
    r = run_dl(["-n", 2, "-d", out, "--base-url", server.url, "--retries", 1], tmp_path)
    assert r.returncode == 1
    assert "not a readable parquet" in r.stdout
    assert len(server.gets(name)) == 2  # retried once
    assert not (out / name).exists() and not (out / (name + ".part")).exists()
    assert (out / "shard_00000.parquet").is_file()  # the good shard is still kept


def test_404_is_a_clean_failure(server, tmp_path):
    out = tmp_path / "out"
    r = run_dl(["-n", 5, "-w", 2, "-d", out, "--base-url", server.url], tmp_path)  # 4 exist
    assert r.returncode == 1
    assert "HTTP 404" in r.stdout and "Traceback" not in r.stderr
    assert len(server.gets("shard_00004.parquet")) == 1  # a 404 is not retried
    assert not list(out.glob("shard_00004*"))
    assert len(list(out.glob("*.parquet"))) == 4


def test_dropped_connection_retries_with_backoff_and_resumes(server, tmp_path):
    name = "shard_00002.parquet"
    server.drop[name] = [5000, 9000]  # the first two attempts die mid-body
    out = tmp_path / "out"
    r = run_dl(["-n", 3, "-d", out, "--base-url", server.url, "--retries", 2], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / name).read_bytes() == server.files[name]
    (s0, t0), (s1, t1), (s2, t2) = server.gets(name)
    assert (s0, s1, s2) == (0, 5000, 9000)  # each retry resumes where the last one stopped
    assert t1 - t0 >= 0.9 and t2 - t1 >= 1.9  # backoff 1 s, then 2 s


def test_dropped_connection_gives_up_cleanly(server, tmp_path):
    name = "shard_00000.parquet"
    server.drop[name] = [4000]
    out = tmp_path / "out"
    r = run_dl(["-n", 1, "-d", out, "--base-url", server.url, "--retries", 0], tmp_path)
    assert r.returncode == 1
    assert "dropped" in r.stdout or "IncompleteRead" in r.stdout
    assert not (out / name).exists()
    assert (out / (name + ".part")).stat().st_size == 4000  # kept for the next run to resume


def test_bad_arguments(tmp_path):
    r = run_dl(["-n", 0, "-d", tmp_path], tmp_path)
    assert r.returncode != 0 and "error: -n" in r.stderr


# --- the standard library only, honest progress, nothing created by a run that fails ---

NO_SITE = ("-I", "-S")  # isolated, without site-packages: an interpreter with no venv packages


def test_no_site_interpreter_really_lacks_the_packages():
    # Without this the standard-library test below could pass on a script that imports tqdm.
    for module in ("tqdm", "pyarrow"):
        r = subprocess.run([sys.executable, *NO_SITE, "-c", f"import {module}"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, module


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_runs_on_the_standard_library_alone(server, tmp_path, method):
    out = tmp_path / "out"
    args = ["-n", 3, "-w", 2, "-d", out, "--base-url", server.url, "--start-method", method]
    r = run_dl(args, tmp_path, flags=NO_SITE)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "3 downloaded" in r.stdout
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"):
        assert (out / name).read_bytes() == server.files[name]
    r = run_dl(args, tmp_path, flags=NO_SITE)  # the built-in parquet check accepts them
    assert r.returncode == 0 and "3 already complete" in r.stdout, r.stdout + r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections to it are refused


def failure_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(rf"failed +{name}: \S", line)]


@pytest.mark.parametrize("fault", ["404", "503", "corrupt", "refused"])
def test_total_failure_creates_no_folder(server, tmp_path, fault):
    url = server.url
    if fault == "404":
        server.files = {}
    elif fault == "503":
        server.status = 503
    elif fault == "corrupt":  # a response arrives (so the folder appears) but no shard is good
        server.files = {name: b"PAR1" + os.urandom(20_000) for name in server.files}
    else:
        url = f"http://127.0.0.1:{free_port()}/data"
    target = tmp_path / "new" / "fineweb"
    r = run_dl(["-n", 2, "-w", 2, "-d", target, "--base-url", url, "--retries", 1], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()  # neither the folder nor its missing parent
    assert not [line for line in (r.stdout + r.stderr).splitlines() if "100%" in line]
    assert "0 downloaded" in r.stdout and "2 failed" in r.stdout
    for i in range(2):
        assert failure_lines(r.stderr, f"shard_0000{i}.parquet")  # as it happens, with a reason
        assert failure_lines(r.stdout, f"shard_0000{i}.parquet")  # and in the summary


def test_failed_run_keeps_a_folder_that_existed(server, tmp_path):
    server.files = {}
    out = tmp_path / "mine"
    out.mkdir()
    r = run_dl(["-n", 1, "-d", out, "--base-url", server.url, "--retries", 0], tmp_path)
    assert r.returncode == 1
    assert out.is_dir()  # only folders the run itself created are removed


def test_partial_failure_is_reported_as_a_failure(server, tmp_path):
    bad = "shard_00001.parquet"
    server.files[bad] = b"PAR1" + os.urandom(60_000)
    out = tmp_path / "out"
    r = run_dl(["-n", 3, "-w", 2, "-d", out, "--base-url", server.url, "--retries", 0], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "100%" not in text
    assert not [line for line in text.splitlines() if bad in line and re.search(r"\bok\b", line)]
    assert any("not a readable parquet" in line for line in failure_lines(r.stderr, bad))
    for good in ("shard_00000.parquet", "shard_00002.parquet"):
        assert re.search(rf"\] ok +{good}", r.stderr) and (out / good).is_file()
    assert "2 downloaded" in r.stdout and "1 failed" in r.stdout


def run_in_terminal(args, home, timeout=60) -> tuple[int, str]:
    """Run the script with stdout and stderr on a pseudo-terminal; returns (status, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, str(REPO / "download_data.py"), *map(str, args)],
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the script exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode()


def test_terminal_progress_line_and_a_failed_shard(server, tmp_path):
    bad = "shard_00001.parquet"
    server.files[bad] = b"PAR1" + os.urandom(300_000)  # 19 slow pieces: the line redraws
    server.delay = 0.05
    status, text = run_in_terminal(["-n", 3, "-w", 3, "-d", tmp_path / "out",
                                    "--base-url", server.url, "--retries", 0], tmp_path)
    assert status == 1, text
    segments = re.split(r"[\r\n]", text)
    assert any(re.search(r"#1 \d+%", s) for s in segments)  # a live percentage, redrawn in place
    assert not [s for s in segments if "100%" in s]
    assert failure_lines(text.replace("\r", "\n"), bad)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_shard_shows_99_percent_until_it_is_checked(monkeypatch):
    import download_data as dl
    monkeypatch.setenv("COLUMNS", "120")
    assert dl.percent(0, 1000) == "0%" and dl.percent(500, 1000) == "50%"
    assert dl.percent(1000, 1000) == "99%"  # every byte arrived, but it is not checked yet
    assert dl.percent(2_500_000, None) == "2.5 MB"  # no Content-Length: no share to show
    term = FakeTerminal()
    progress = dl.Progress(2, stream=term)
    progress.update(1, 1000, 1000, 1000)
    progress.draw(force=True)
    progress.result(1, "failed", "not a readable parquet file (x)")
    progress.update(1, 0, 1000, 1000)  # a late byte report must not bring the shard back
    progress.draw(force=True)
    lines = [s.strip() for s in re.split(r"[\r\n]", term.getvalue()) if s.strip()]
    assert "#1 99%" in lines[0] and not [s for s in lines if "100%" in s]
    assert lines[1] == "[1/2] failed  shard_00001.parquet: not a readable parquet file (x)"
    assert lines[-1].startswith("0% 0/2 shards, 1 failed") and "#1" not in lines[-1]
    progress.result(0, "ok", "0.1 MB")
    assert "[2/2] ok      shard_00000.parquet (0.1 MB)" in term.getvalue()


@pytest.mark.parametrize("with_pyarrow", [True, False])
def test_shard_check_catches_cut_files_with_or_without_pyarrow(tmp_path, monkeypatch, with_pyarrow):
    import download_data as dl
    if not with_pyarrow:  # plain python: the footer check alone
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for k, table in enumerate([pa.table({"text": ["a", "b"]}), pa.table({"id": [1, 2]})]):
        path = tmp_path / f"t{k}.parquet"
        pq.write_table(table, path, row_group_size=1)
        has_text = "text" in table.column_names
        assert (dl.parquet_problem(path) is None) == (has_text or not with_pyarrow)
        data = path.read_bytes()
        for cut in (1, 8, len(data) // 2, len(data) - 4):
            path.write_bytes(data[:-cut])
            assert "not a readable parquet" in dl.parquet_problem(path)
    path.write_bytes(b"PAR1" + bytes(range(256)) + (10**6).to_bytes(4, "little") + b"PAR1")
    assert "not a readable parquet" in dl.parquet_problem(path)  # magic right, length wrong


@pytest.mark.parametrize("args", [["-n", 0], ["-n", -2], ["-w", 0], ["--retries", -1],
                                  ["-n", "ten"], ["--base-url", "example.com/data"], ["--bogus"],
                                  ["-d", "FILE/sub"]])
def test_bad_input_is_one_clear_line(tmp_path, args):
    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a == "FILE/sub" else a for a in args]
    r = run_dl([*args] if "-d" in args else [*args, "-d", tmp_path / "out"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
