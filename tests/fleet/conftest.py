"""The fleet tests' real PostgreSQL server: a throwaway cluster in a temporary directory, started by the test
as an unprivileged user, listening on a unix socket only (no TCP); skipped, with the reason, where no
server can be started."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _initdb() -> str | None:
    found = shutil.which("initdb")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return str(candidates[-1]) if candidates else None


class Server(str):
    """The server's SQLAlchemy URL, which can also restart the server (the fault tests)."""

    def restart(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast",
                        "restart"], check=True, capture_output=True)


@pytest.fixture
def postgres():
    """A real PostgreSQL server in a temporary directory (as an unprivileged user when run as root, which
    PostgreSQL refuses to run as; the directory is outside pytest's, which only root may enter)."""
    import tempfile

    pytest.importorskip("psycopg")
    initdb = _initdb()
    if initdb is None:
        pytest.skip("PostgreSQL's server (initdb) is not installed")
    root = Path(tempfile.mkdtemp(prefix="keyedge-pg-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "nobody")
    bindir = Path(initdb).parent
    subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-U", "keyedge", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    port = str(20000 + os.getpid() % 20000)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l", str(root / "log"),
                    "-o", f"-p {port} -k {root} -c listen_addresses=''", "start"], check=True, capture_output=True)
    server = Server(f"postgresql+psycopg://keyedge@/postgres?host={root}&port={port}")
    server.as_user, server.bindir, server.data = as_user, bindir, root / "data"
    try:
        yield server
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
