"""The fleet tests run on a SQLite file and on a real PostgreSQL server (``database``): one throwaway
cluster for the session, in a temporary directory, started by the tests as an unprivileged user and
listening on a unix socket only (no TCP), a fresh database for each test; the PostgreSQL half skips,
with the reason, where no server can be started. The cluster trusts its superuser on the socket, and asks
one role, ``PASSWORD_ROLE``, for its password (scram-sha-256): what a refused password looks like."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PASSWORD_ROLE, PASSWORD = "keyedge_pw", "right-horse-battery"


def _initdb() -> str | None:
    found = shutil.which("initdb")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return str(candidates[-1]) if candidates else None


class Server(str):
    """A database's SQLAlchemy URL on the session's server, which can also restart the server."""
    cluster: "_Cluster"

    def restart(self) -> None:
        self.cluster.ctl("-w", "-m", "fast", "-l", str(self.cluster.root / "log"), "restart")  # the log, not our pipes


class _Cluster:
    def __init__(self) -> None:
        initdb = _initdb()
        if initdb is None:
            raise RuntimeError("PostgreSQL's server (initdb) is not installed")
        self.root = Path(tempfile.mkdtemp(prefix="keyedge-pg-"))  # outside pytest's dirs, which only root enters
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []  # PostgreSQL refuses root
        if self.as_user:
            shutil.chown(self.root, "nobody")
        self.bindir, self.port = Path(initdb).parent, str(20000 + os.getpid() % 20000)
        subprocess.run([*self.as_user, initdb, "-D", str(self.root / "data"), "-U", "keyedge", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True)
        hba = self.root / "data" / "pg_hba.conf"  # the password role's line first: the first match decides
        hba.write_text(f"local all {PASSWORD_ROLE} scram-sha-256\n" + hba.read_text())
        self.ctl("-w", "-l", str(self.root / "log"), "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses='' -c max_connections=300", "start")
        self.names = itertools.count()
        self.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")  # scram-sha-256: 15's default

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args],
                       check=True, capture_output=True)

    def url(self, database: str, user: str = "keyedge", password: str | None = None) -> str:
        login = user if password is None else f"{user}:{password}"
        return f"postgresql+psycopg://{login}@/{database}?host={self.root}&port={self.port}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.root), port=self.port, user="keyedge", dbname="postgres",
                             autocommit=True) as c:
            c.execute(sql)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    pytest.importorskip("psycopg")
    try:
        cluster = _Cluster()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no PostgreSQL server could be started here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres(pg_cluster):
    """A fresh database on the session's PostgreSQL server."""
    from keyedge.fleet import db as fleet_db

    name = f"fleet_{next(pg_cluster.names)}"
    pg_cluster.admin(f"CREATE DATABASE {name}")
    server = Server(pg_cluster.url(name))
    server.cluster = pg_cluster
    yield server
    fleet_db.forget(server)
    pg_cluster.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """The fleet database of a test, on each backend in turn."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("postgres")


def rows(database: str, sql: str, *params) -> list[tuple]:
    """Rows of a query, on either backend (through keyedge's own engine for it)."""
    import sqlalchemy as sa

    from keyedge.fleet import db as fleet_db

    with fleet_db.engine_for(database).connect() as c:
        return [tuple(r) for r in c.execute(sa.text(sql), dict(enumerate(params)))]


def as_json(value):
    """A JSON column's value: SQLite hands back text, PostgreSQL the decoded object."""
    return json.loads(value) if isinstance(value, str) else value


def state(root: Path, database: str) -> tuple:
    """The database's rows and the vault's bytes (what a refused command must leave as it was)."""
    import hashlib

    tables = tuple(tuple(map(repr, rows(database, f"SELECT * FROM {t} ORDER BY 1")))
                   for t in ("fleet", "devices", "events", "releases", "waves", "alembic_version"))
    return tables, hashlib.sha256((root / "fleet.vault").read_bytes()).hexdigest()
