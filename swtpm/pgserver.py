"""A throwaway PostgreSQL from the machine's binaries, for simulations and tests.

``PgServer`` runs ``initdb`` into a directory of its own, starts ``postgres`` on a free
loopback port with its unix socket in that directory and password (scram) authentication,
so that its URL carries credentials as a real deployment's would, and stops it by its pid.
``restart`` keeps the port and the data: what a database restart under load looks like to
the verifiers. PostgreSQL refuses to run as root; as root, initdb and the server run as
``nobody``, in a directory that user can reach.

``devtrust simulate --postgres`` and the tests' fixture (tests/pg.py) both start theirs here:
one way to start one.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from devtrust.core.errors import DevtrustError

USER = "devtrust"
START_TIMEOUT_S = 30.0
_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
# The server's unix socket is DIRECTORY/.s.PGSQL.PORT, and a socket's path must fit in 107
# bytes: a longer directory gets a temporary one.
_SOCKET_DIR_MAX = 80


class PgServerError(DevtrustError):
    """PostgreSQL's binaries are missing, or the server would not start."""


def bindir() -> Path:
    """Where initdb and postgres are: pg_config's bindir, or the newest
    /usr/lib/postgresql/N/bin."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found and (Path(found) / "initdb").is_file():
            return Path(found)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not versions:
        raise PgServerError(
            "PostgreSQL's server binaries (initdb, postgres) are not installed: install the "
            "postgresql package (`make test` does), or give --database URL of a running server"
        )
    return Path(versions[-1]).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner may walk down to ``path`` (nobody must, to reach
    its data directory as root's server)."""
    for part in [path, *path.parents]:
        with contextlib.suppress(OSError):
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
    return True


class PgServer:
    """One PostgreSQL cluster in ``directory`` (made; a temporary one when None, or when
    the server's user could not reach it or its socket path would be too long)."""

    def __init__(
        self, directory: Path | None = None, *, max_connections: int = 300, fsync: bool = False
    ) -> None:
        self.bin = bindir()
        self._as = _NOBODY if os.geteuid() == 0 else []
        if directory is not None:
            directory = directory.resolve()
        if (
            directory is None
            or len(str(directory)) > _SOCKET_DIR_MAX
            or (self._as and not _reachable_by_others(directory.parent))
        ):
            directory = Path(tempfile.mkdtemp(prefix="devtrust-pg-"))
            self._temporary = True
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._temporary = False
        self.root = directory
        self.data = directory / "data"
        self.log_path = directory / "server.log"
        self.password = secrets.token_hex(12)
        self.port = free_port()
        self.max_connections = max_connections
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._names = itertools.count(1)
        self._initdb()

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as:
            os.chmod(self.root, 0o700)
            shutil.chown(self.root, "nobody", "nogroup")
            shutil.chown(pwfile, "nobody", "nogroup")
        done = subprocess.run(
            [
                *self._as,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise PgServerError(
                f"initdb {self.data} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgServer:
        """Start the server and wait until it takes a connection."""
        log = self.log_path.open("ab")
        command = [
            *self._as,
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.root),
            "-c",
            f"max_connections={self.max_connections}",
        ]
        if not self.fsync:
            # Tests and simulations need no durability across a crash of the machine; a
            # clean restart (and a crash of the server alone) keeps everything.
            command += ["-c", "fsync=off"]
        # Its own session: a ^C at the simulator's terminal is the simulator's to handle,
        # and it stops the server in order, after the verifiers.
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise PgServerError(
                        f"PostgreSQL did not start on port {self.port}: {self.log_tail()}"
                    ) from None
                time.sleep(0.1)
            else:
                return self

    def stop(self, sig: int = signal.SIGINT, *, timeout: float = 30.0) -> None:
        """Stop the server by its pid (SIGINT: fast shutdown; SIGKILL: a crash)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if sig == signal.SIGKILL:
            # Its backends outlive the postmaster a moment and hold the shared memory: the
            # next start would refuse while they do.
            time.sleep(0.5)

    def restart(self, sig: int = signal.SIGINT) -> None:
        """Stop and start again: the same port, the same data."""
        self.stop(sig)
        self.start()
        self.restarts += 1

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database (a name made up when None); its name."""
        name = name or f"d{os.getpid()}_{next(self._names)}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the server; a temporary directory is removed."""
        self.stop()
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)
