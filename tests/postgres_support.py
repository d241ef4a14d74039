"""A throw-away PostgreSQL server for tests: Debian's `postgresql` package (./run installs it),
a cluster made by initdb in a temporary folder, reached over a Unix socket in that folder only
(no TCP port), stopped and removed afterwards.

initdb and postgres refuse to run as root: as root they run as the `postgres` user, on a folder
handed to it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def postgres_bin_dir() -> Path | None:
    """The newest installed server's binaries (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import or load
_PR_SET_PDEATHSIG = 1
_SIGINT = int(signal.SIGINT)


def _stop_with_parent() -> None:
    """In the server's child, before exec: a fast shutdown when the test process dies (a
    killed pytest must not leave a server running)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, _SIGINT)


class PostgresCluster:
    """One server on one cluster; `url(dbname)` names a database in it."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        bin_dir = bin_dir or postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's server is not installed (Debian: apt-get install postgresql; ./run does it)")
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="jobs-pg-"))
        self.data = self.folder / "data"
        self.socket_dir = self.folder  # the socket file: .s.PGSQL.<port> here
        self.port = 5432  # only names the socket file, in a folder of our own: never taken
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self.superuser = self.user or pwd.getpwuid(os.geteuid()).pw_name
        self.log = self.folder / "server.log"
        self.process: subprocess.Popen | None = None
        self._run([str(bin_dir / "initdb"), "-D", str(self.data), "-U", self.superuser,
                   "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"])

    def _run(self, argv: list[str]) -> None:
        out = subprocess.run(argv, user=self.user, capture_output=True, text=True, timeout=120,
                             cwd=self.folder)
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {out.stdout}{out.stderr}")

    def start(self) -> None:
        log = open(self.log, "ab")
        try:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data), "-k", str(self.socket_dir),
                 "-p", str(self.port), "-c", "listen_addresses=", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=100"],
                user=self.user, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                preexec_fn=_stop_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run([str(self.bin_dir / "pg_isready"), "-h", str(self.socket_dir),
                                    "-p", str(self.port), "-q"], timeout=30)
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions are cut, the server is gone when this returns."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "jobs_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
