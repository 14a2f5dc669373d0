"""Wait for a training job on Kubernetes from the triggerer, and kill it when the task is killed.

The Kubernetes client is synchronous; each poll runs it in a thread (asyncio.to_thread), which
is what the triggerer's event loop needs: short blocking calls off the loop, never a sleep on it.
Node 0's log is tailed as the job runs; the triggerer's log lines show in the task's log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

# Consecutive failed polls (API server restarts, network blips) before giving up on the job.
MAX_POLL_ERRORS = 5


class TrainJobTrigger(BaseTrigger):
    """Fires once, when the TrainJob (or PyTorchJob) ends or cannot be watched any more.

    Event payload: {"status": "succeeded" | "failed" | "error", "message", "name", "namespace",
    "log_tail"}; "error" means the job's state could not be read (it may still be running).

    :param name: the job's name (deterministic: trainer.remote_train.start_training returns it)
    :param namespace: the job's namespace
    :param legacy_pytorchjob: the job is a Training Operator PyTorchJob, not a TrainJob
    :param poll_seconds: seconds between status polls
    :param kube_config_file: kubeconfig to use instead of the in-cluster service account
    :param kube_context: context of the kubeconfig
    :param log_lines: how many of node 0's last log lines the event carries
    """

    def __init__(
        self,
        *,
        name: str,
        namespace: str,
        legacy_pytorchjob: bool = False,
        poll_seconds: float = 30.0,
        kube_config_file: str | None = None,
        kube_context: str | None = None,
        log_lines: int = 100,
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.legacy_pytorchjob = legacy_pytorchjob
        self.poll_seconds = poll_seconds
        self.kube_config_file = kube_config_file
        self.kube_context = kube_context
        self.log_lines = log_lines

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "legacy_pytorchjob": self.legacy_pytorchjob,
                "poll_seconds": self.poll_seconds,
                "kube_config_file": self.kube_config_file,
                "kube_context": self.kube_context,
                "log_lines": self.log_lines,
            },
        )

    @property
    def _what(self) -> str:
        kind = "PyTorchJob" if self.legacy_pytorchjob else "TrainJob"
        return f"{kind} {self.namespace}/{self.name}"

    def _event(self, status: str, message: str, log: str) -> TriggerEvent:
        from imlt.trainer.remote_train import tail

        return TriggerEvent({"status": status, "message": message, "name": self.name, "namespace": self.namespace,
                             "log_tail": tail(log, self.log_lines)})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from imlt.trainer import k8s_jobs, remote_train

        api, core = await asyncio.to_thread(remote_train.kube_clients, self.kube_config_file, self.kube_context)
        legacy = self.legacy_pytorchjob

        def node0(_: dict[str, Any]) -> str:
            return remote_train.node0_log(self.name, self.namespace, core, legacy=legacy)

        logs = k8s_jobs.LogTail(node0, self.log.info)
        errors = 0
        self.log.info("waiting for %s", self._what)
        while True:
            try:
                state, message = await asyncio.to_thread(remote_train.job_state, self.name, self.namespace, api, legacy=legacy)
                errors = 0
            except Exception as e:  # noqa: BLE001 - a blip is retried; persistent failure ends the wait
                errors += 1
                self.log.warning("reading %s failed (%d/%d): %s", self._what, errors, MAX_POLL_ERRORS, e)
                if errors >= MAX_POLL_ERRORS:
                    yield self._event("error", f"cannot read {self._what}: {e}", logs.seen)
                    return
                await asyncio.sleep(self.poll_seconds)
                continue
            await asyncio.to_thread(logs, {})
            if state != "running":
                self.log.info("%s %s%s", self._what, state, f": {message}" if message else "")
                yield self._event(state, message, logs.seen)
                return
            await asyncio.sleep(self.poll_seconds)

    async def on_kill(self) -> None:
        """The task was killed while deferred (mark failed, clear): do not leave the job holding nodes."""
        from imlt.trainer import remote_train

        api, _ = await asyncio.to_thread(remote_train.kube_clients, self.kube_config_file, self.kube_context)
        deleted = await asyncio.to_thread(remote_train.delete_job, self.name, self.namespace, api,
                                          legacy=self.legacy_pytorchjob)
        self.log.info("%s %s", self._what, "deleted" if deleted else "was already gone")
