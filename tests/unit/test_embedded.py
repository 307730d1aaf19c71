"""Root's embedded-Postgres clusters: which are stale, where links may lead, cached file modes."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from lodestar.common import embedded
from lodestar.common.errors import ConfigurationError


@pytest.fixture
def clusters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty clusters folder under a system home of the test's own."""
    monkeypatch.setattr(embedded, "SYSTEM_HOME", tmp_path / "home")
    folder = tmp_path / "home" / "clusters"
    folder.mkdir(parents=True)
    return folder


def _me() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


def _data_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name / "pg"
    folder.mkdir(parents=True)
    return folder


def test_a_new_cluster_is_linked_from_its_data_dir_and_owned_by_the_server_user(
    tmp_path: Path, clusters: Path
):
    data_dir = _data_dir(tmp_path, "project")
    cluster = embedded._new_cluster(clusters, data_dir, _me())
    assert cluster.parent == clusters
    assert (data_dir / "cluster").is_symlink()
    assert embedded._linked_cluster(data_dir) == cluster
    assert (cluster / "owner").read_text() == f"{data_dir}\n"
    assert (cluster / "data").stat().st_mode & 0o777 == 0o700
    assert (cluster / "data").stat().st_uid == os.getuid()
    assert [path.name for path in data_dir.iterdir()] == ["cluster"]  # no staged link left


def test_only_clusters_no_data_dir_links_to_and_no_server_runs_on_are_removed(
    tmp_path: Path, clusters: Path
):
    live = embedded._new_cluster(clusters, _data_dir(tmp_path, "live"), _me())
    gone_dir = _data_dir(tmp_path, "gone")
    gone = embedded._new_cluster(clusters, gone_dir, _me())
    (gone_dir / "cluster").unlink()
    gone_dir.rmdir()
    reused_dir = _data_dir(tmp_path, "reused")
    replaced = embedded._new_cluster(clusters, reused_dir, _me())
    current = embedded._new_cluster(clusters, reused_dir, _me())  # same path, a fresh cluster
    running_dir = _data_dir(tmp_path, "running")
    running = embedded._new_cluster(clusters, running_dir, _me())
    (running_dir / "cluster").unlink()
    (running / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n{running / 'data'}\n")
    ownerless = clusters / "crashed-mid-creation"
    ownerless.mkdir()

    removed = embedded.remove_stale_clusters(clusters)

    assert set(removed) == {gone, replaced, ownerless}
    assert replaced != current
    assert sorted(path.name for path in clusters.iterdir()) == sorted(
        [live.name, current.name, running.name]
    )


def test_a_dead_postmaster_does_not_keep_its_cluster(tmp_path: Path, clusters: Path):
    data_dir = _data_dir(tmp_path, "crashed")
    cluster = embedded._new_cluster(clusters, data_dir, _me())
    (data_dir / "cluster").unlink()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    (cluster / "data" / "postmaster.pid").write_text(finished.stdout)
    assert embedded.remove_stale_clusters(clusters) == [cluster]


def test_a_link_leading_outside_the_clusters_folder_is_refused(tmp_path: Path, clusters: Path):
    data_dir = _data_dir(tmp_path, "tampered")
    (data_dir / "cluster").symlink_to("/etc")
    with pytest.raises(ConfigurationError, match=r"cluster must point into .*clusters"):
        embedded._linked_cluster(data_dir)


def test_the_shared_copy_is_readable_by_everyone_whatever_the_umask(tmp_path: Path):
    tree = tmp_path / "copy"
    (tree / "bin").mkdir(parents=True, mode=0o700)
    (tree / "bin" / "postgres").write_text("")
    (tree / "bin" / "postgres").chmod(0o700)
    (tree / "share.txt").write_text("")
    (tree / "share.txt").chmod(0o600)
    (tree / "link").symlink_to("share.txt")
    embedded._make_world_readable(tree)
    assert tree.stat().st_mode & 0o777 == 0o755
    assert (tree / "bin").stat().st_mode & 0o777 == 0o755
    assert (tree / "bin" / "postgres").stat().st_mode & 0o777 == 0o755
    assert (tree / "share.txt").stat().st_mode & 0o777 == 0o644


class _Distribution:
    def __init__(self, version: str, record: str | None) -> None:
        self.version, self._record = version, record

    def read_text(self, name: str) -> str | None:
        assert name == "RECORD"
        return self._record


def test_the_cached_copy_is_named_by_version_and_recorded_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    package = tmp_path / "embedded_postgres"
    installed = _Distribution("18.6.3", "embedded_postgres/pginstall/bin/postgres,sha256=a,1\n")
    monkeypatch.setattr(embedded.importlib.metadata, "distribution", lambda name: installed)
    first = embedded._installation_name(package)
    assert first.startswith("pgsql-18.6.3-")
    assert embedded._installation_name(package) == first
    installed._record = "embedded_postgres/pginstall/bin/postgres,sha256=b,1\n"
    assert embedded._installation_name(package) != first


def test_without_a_record_the_files_sizes_name_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    package = tmp_path / "embedded_postgres"
    (package / "pginstall" / "bin").mkdir(parents=True)
    (package / "pginstall" / "bin" / "postgres").write_text("v1")
    unrecorded = _Distribution("18.6.3", None)
    monkeypatch.setattr(embedded.importlib.metadata, "distribution", lambda name: unrecorded)
    first = embedded._installation_name(package)
    (package / "pginstall" / "bin" / "postgres").write_text("v1 patched")
    assert embedded._installation_name(package) != first
