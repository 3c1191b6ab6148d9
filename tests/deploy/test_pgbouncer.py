"""The PgBouncer note of README.md ("Deploy"), checked: with the main URL through PgBouncer in
transaction mode, CONVEYOR_PREPARED_STATEMENTS=off and a direct CONVEYOR_LISTEN_DATABASE_URL
(LISTEN and the maintenance leader's session lock), every run goes through every stage once.
Needs Debian's pgbouncer (.ci/run installs it)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from tests.helpers import ConveyorProcess, conveyor_env, fetch_all, scalar, wait_until

RUNS = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def pooled_url(database_url: str) -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test database; its URL."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    assert Path(binary).exists(), (
        "pgbouncer is missing: `apt-get install pgbouncer` (make test installs it)"
    )
    target = conninfo.conninfo_to_dict(database_url)
    host = str(target.get("host") or "127.0.0.1")
    # Not under pytest's tmp_path: PgBouncer may run as another user, who must reach its files.
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-pgbouncer-"))
    workdir.chmod(0o777)
    port = free_port()
    server = " ".join(
        f"{key}={target[key]}" for key in ("host", "port", "user", "password") if target.get(key)
    )
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\n{target['dbname']} = {server} dbname={target['dbname']}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\n"
        "max_client_conn = 100\ndefault_pool_size = 4\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {workdir}/pgbouncer.log\n"
    )
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        # PgBouncer will not run as root; a Unix socket's directory may admit only its owner.
        owner = os.stat(host).st_uid if host.startswith("/") else pwd.getpwnam("nobody").pw_uid
        command[1:1] = ["-u", pwd.getpwuid(owner).pw_name]
    bouncer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"postgresql://{target.get('user', 'postgres')}@127.0.0.1:{port}/{target['dbname']}"
    try:
        wait_until(lambda: can_connect(url) or bouncer.poll() is not None, 15, "PgBouncer started")
        assert bouncer.poll() is None, bouncer.communicate()[0].decode(errors="replace")
        yield url
    finally:
        bouncer.send_signal(signal.SIGTERM)
        bouncer.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def can_connect(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def test_the_pipeline_runs_through_pgbouncer_in_transaction_mode(
    database_url: str, pooled_url: str, tmp_path: Path
) -> None:
    supervisor = ConveyorProcess(
        ["run"],
        conveyor_env(
            pooled_url,
            CONVEYOR_LISTEN_DATABASE_URL=database_url,
            CONVEYOR_PREPARED_STATEMENTS="off",
            CONVEYOR_SWEEP_INTERVAL="1",
        ),
        tmp_path / "run.log",
    )
    try:
        with psycopg.connect(pooled_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (input)"
                " SELECT jsonb_build_object('question', 'pooled ' || n)"
                " FROM generate_series(1, %s) n",
                (RUNS,),
            )
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'",
                )
                == RUNS
            ),
            120,
            "every run DONE through PgBouncer",
        )
    finally:
        code = supervisor.stop(timeout=60)
    log = supervisor.log()
    assert code == 0, log
    assert '"level": "error"' not in log, log
    # each stage's transition applied exactly once per run
    events = fetch_all(
        database_url, "SELECT stage, count(*), count(DISTINCT run_id) FROM conveyor.run_events"
        " WHERE (stage, to_status) IN"
        " (('analyze', 'ANALYZED'), ('assemble', 'CONTEXT_READY'), ('answer', 'DONE'))"
        " GROUP BY stage ORDER BY stage",
    )  # fmt: skip
    assert events == [("analyze", RUNS, RUNS), ("answer", RUNS, RUNS), ("assemble", RUNS, RUNS)]
    # and nothing else happened to a run but hand-offs given back (a worker with no room)
    others = fetch_all(
        database_url,
        "SELECT DISTINCT error FROM conveyor.run_events WHERE (stage, to_status) NOT IN"
        " (('analyze', 'ANALYZED'), ('assemble', 'CONTEXT_READY'), ('answer', 'DONE'))",
    )
    assert set(others) <= {("released: handed to a worker with no free slot",)}, others
