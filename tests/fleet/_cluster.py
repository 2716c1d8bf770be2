"""A private PostgreSQL cluster for one test, so that the test may restart it at will.

The shared server (`tests/pg.py`) cannot be restarted under other tests; this one lives
in a temporary directory, listens on a free port of 127.0.0.1 (and a socket in its own
directory), and is stopped and deleted at the end. It runs with `fsync=off`, which an
immediate stop (a crash of the server, not of the machine) does not make lossy; never
`synchronous_commit=off`, with which such a stop loses commits already acknowledged. As root, every
PostgreSQL command runs as the `postgres` user (initdb refuses to run as root).

`GARRISON_PG_BIN` names the directory of initdb and pg_ctl (default: the newest
/usr/lib/postgresql/*/bin, else the PATH). Without them the test is skipped, which
`tests/conftest.py` turns into a failure under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["Cluster", "private_cluster"]

DATABASE = "fleet"


def _bin_dir() -> Path | None:
    configured = os.environ.get("GARRISON_PG_BIN")
    if configured:
        return Path(configured) if (Path(configured) / "initdb").exists() else None
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """One initialised data directory and the server running on it."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port
        self.log = root / "server.log"
        self.as_postgres = os.geteuid() == 0

    def url(self, schema: str = "garrison") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}?schema={schema}"

    @property
    def dsn(self) -> str:
        """The plain libpq URL of the test database (no Garrison options)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / command[0]), *command[1:]]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\n{self.server_log()}")
        return done

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", timeout=120)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                  "start", "-w", "-t", "60", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "stop", "-m", mode, "-w", "-t", "60",
                  timeout=90)

    def running(self) -> bool:
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    def create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                                     autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """A fresh, running cluster with an empty database `fleet`; removed afterwards."""
    bin_dir = _bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install "
                    "postgresql or set GARRISON_PG_BIN to their directory")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root needs a 'postgres' user to run initdb as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root needs runuser(1) to run initdb as postgres")
    root = Path(tempfile.mkdtemp(prefix="garrison-pg-"))
    cluster = Cluster(bin_dir, root, _free_port())
    try:
        if cluster.as_postgres:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        root.chmod(0o700)
        cluster.init()
        cluster.start()
        cluster.create_database()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            if cluster.running():
                cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
