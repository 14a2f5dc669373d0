"""A throwaway `airflow standalone` (API server, scheduler, DAG processor, triggerer) for tests.

Runs Airflow's real scheduler on SQLite in a temp AIRFLOW_HOME, bound to 127.0.0.1 on free
ports, in its own process group so that stopping it stops every child it started. Tests drive it
through the REST API (v2) with a token from POST /auth/token, as a user or another system would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TERMINAL = {"success", "failed"}


class StandaloneUnavailable(RuntimeError):
    """`airflow standalone` did not come up here (a reason to skip, not a test failure)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AirflowStandalone:
    """Start with `with AirflowStandalone(home, dags, env) as af:`; `af.api(...)` talks to it."""

    home: Path
    dags_folder: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "standalone.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OSS_"))}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            # free ports for the log servers too, so parallel runs never collide
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # pick up the DAG file and queued runs quickly
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            # two task processes at most: tests share small machines
            "AIRFLOW__CORE__PARALLELISM": "2",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240) -> AirflowStandalone:
        self.port = self.port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "wb")  # noqa: SIM115 - the child writes to it until stopped
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "standalone"], env=self.env(),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StandaloneUnavailable(f"airflow standalone exited with {self.proc.returncode}: "
                                            f"{self.log_tail()}")
            try:
                self.token = self._fetch_token()
                return self
            except (OSError, urllib.error.URLError, FileNotFoundError, KeyError, ValueError):
                time.sleep(2)
        raise StandaloneUnavailable(f"airflow standalone did not answer on {self.base} within {timeout:.0f} s: "
                                    f"{self.log_tail()}")

    def _fetch_token(self) -> str:
        users = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        user, password = next(iter(users.items()))
        req = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                     data=json.dumps({"username": user, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["access_token"]

    def stop(self) -> None:
        """Stop the whole process group (scheduler, API server, task processes); kill what lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                # children may outlive the parent briefly: make sure the group is gone
                os.killpg(pgid, signal.SIGKILL)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                pass
            return

    def __enter__(self) -> AirflowStandalone:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    # --- REST API v2 -----------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(f"{self.base}/api/v2/{path.lstrip('/')}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        for attempt in range(3):  # a busy machine (tasks importing torch) can stall the API server
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
            except TimeoutError:
                if attempt == 2 or method not in ("GET", "PATCH"):  # never repeat a trigger
                    raise

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        """Wait until the DAG processor has parsed DAG_ID (import errors fail at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.api("GET", "importErrors")["import_errors"]
            if errors:
                raise AssertionError(f"DAG import errors: {errors}")
            try:
                return self.api("GET", f"dags/{dag_id}")
            except AssertionError as e:
                if "HTTP 404" not in str(e):
                    raise
            time.sleep(2)
        raise AssertionError(f"DAG {dag_id} not parsed within {timeout:.0f} s: {self.log_tail()}")

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict, logical_date: str | None) -> dict:
        """POST dagRuns; logical_date None triggers a run without a logical date (Airflow 3)."""
        return self.api("POST", f"dags/{dag_id}/dagRuns", {"conf": conf, "logical_date": logical_date})

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout: float = 600) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        runs: dict[str, dict] = {}
        while time.monotonic() < deadline:
            runs = {r: self.api("GET", f"dags/{dag_id}/dagRuns/{r}") for r in run_ids}
            if all(r["state"] in TERMINAL for r in runs.values()):
                return runs
            for run_id in run_ids:  # a retry waits minutes (the DAG's retry_delay): report the failure now
                retrying = [t for t, s in self.task_states(dag_id, run_id).items() if s == "up_for_retry"]
                if retrying:
                    raise AssertionError(f"{run_id}: {retrying} failed and wait for a retry\n{self.task_logs()[-6000:]}")
            time.sleep(3)
        raise AssertionError(f"runs not finished within {timeout:.0f} s: "
                             f"{ {k: v['state'] for k, v in runs.items()} }\n{self.log_tail()}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    def task_logs(self) -> str:
        """Every task log the run wrote (base_log_folder under AIRFLOW_HOME), concatenated."""
        logs = sorted((self.home / "logs").rglob("*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
