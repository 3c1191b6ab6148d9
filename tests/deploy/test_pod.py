"""A stage's pod as k8s/base configures it, run here as a process against a real PostgreSQL:
its probes answer on the paths the manifests name, the compose healthcheck command passes, it
does its stage's work, and SIGTERM ends it with exit 0 inside terminationGracePeriodSeconds.
The overlay's console pod likewise: probes without credentials, pages only with them."""

from __future__ import annotations

import base64
import http.client
import re
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from tests.deploy.conftest import console_deployments, stage_deployments
from tests.deploy.support import ROOT, container_environment
from tests.helpers import ConveyorProcess, conveyor_env, scalar, wait_until


def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_a_stage_pod_answers_its_probes_does_its_work_and_drains_on_sigterm(
    database_url: str, renderings: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    found = stage_deployments(renderings["base"])["analyze"]
    env = container_environment(renderings["base"], found.container)
    metrics_dir = tmp_path / "metrics"  # the pod's `metrics` emptyDir
    metrics_dir.mkdir()
    env.update(
        CONVEYOR_DATABASE_URL=database_url,  # what the Secret holds
        CONVEYOR_METRICS_PORT="0",  # an ephemeral port: tests never fight over 9464
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    pod = ConveyorProcess(
        found.container["args"], conveyor_env(database_url, **env), tmp_path / "pod.log"
    )
    try:
        port = wait_until(lambda: served_port(pod), 30, "the probe port in the log")
        probes = {
            name: found.container[name]["httpGet"]["path"]
            for name in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        for name, path in probes.items():
            wait_until(lambda path=path: get(port, path) == 200, 30, f"{name} {path}")
        assert get(port, "/metrics") == 200

        # docker-compose.yml's healthcheck, exactly as written, on this port
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        check = compose["services"]["worker-analyze"]["healthcheck"]["test"][1:]
        check = [part.replace(":9464/", f":{port}/") for part in check]
        assert subprocess.run(check, timeout=10, capture_output=True).returncode == 0

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (input)"
                " SELECT jsonb_build_object('question', 'lease ' || n)"
                " FROM generate_series(1, 20) n"
            )
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = %s",
                    (found.stage.produces,),
                )
                == 20
            ),
            60,
            "the pod's stage done for every run",
        )
    finally:
        pod.signal(signal.SIGTERM)
        grace = found.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        try:
            code = pod.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pod.process.kill()
            pod.wait(10)
            raise AssertionError(f"still running {grace}s after SIGTERM:\n{pod.log()}") from None
    assert code == 0, pod.log()


def served_port(process: ConveyorProcess) -> int | None:
    match = re.search(r'"serving /metrics, /healthz, /readyz".*?"port": (\d+)', process.log())
    match = match or re.search(r'"port": (\d+).*?"serving /metrics', process.log())
    return int(match.group(1)) if match else None


def test_the_console_pod_answers_its_probes_asks_for_credentials_and_stops_on_sigterm(
    database_url: str, renderings: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    [found] = console_deployments(renderings["overlay"])
    env = container_environment(renderings["overlay"], found.container)
    metrics_dir = tmp_path / "metrics"  # the pod's `metrics` emptyDir
    metrics_dir.mkdir()
    env.update(
        CONVEYOR_DATABASE_URL=database_url,  # what the Secrets hold
        CONVEYOR_CONSOLE_USER="operator",
        CONVEYOR_CONSOLE_PASSWORD="pod-test-password",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    # the manifest's arguments, on loopback and an ephemeral port rather than 0.0.0.0:8474
    args = list(found.container["args"])
    args[args.index("--bind") + 1] = "127.0.0.1:0"
    pod = ConveyorProcess(args, conveyor_env(database_url, **env), tmp_path / "console.log")
    stream = None
    try:
        port = wait_until(lambda: console_port(pod), 30, "the console's port in the log")
        for name in ("readinessProbe", "livenessProbe"):
            path = found.container[name]["httpGet"]["path"]
            assert get(port, path) == 200, f"{name} {path} without credentials"
        token = base64.b64encode(b"operator:pod-test-password").decode()
        credentials = {"Authorization": f"Basic {token}"}
        assert get(port, "/") == 401
        assert get(port, "/", credentials) == 200

        # docker-compose.yml's console healthcheck, exactly as written, on this port
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        check = compose["services"]["console"]["healthcheck"]["test"][1:]
        check = [part.replace(":8474/", f":{port}/") for part in check]
        assert subprocess.run(check, timeout=10, capture_output=True).returncode == 0

        # an operator watching: an open event stream must not hold the pod past its grace
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stream.request("GET", "/events", headers=credentials)
        assert stream.getresponse().status == 200
    finally:
        pod.signal(signal.SIGTERM)
        grace = found.deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        try:
            code = pod.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pod.process.kill()
            pod.wait(10)
            raise AssertionError(f"still running {grace}s after SIGTERM:\n{pod.log()}") from None
        finally:
            if stream is not None:
                stream.close()
    assert code == 0, pod.log()


def console_port(process: ConveyorProcess) -> int | None:
    match = re.search(r'"console listening".*?"port": (\d+)', process.log())
    match = match or re.search(r'"port": (\d+).*?"console listening', process.log())
    return int(match.group(1)) if match else None
