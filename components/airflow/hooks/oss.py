"""OSS credentials from Airflow's `oss_default` connection, handed to trainer.storage.

The Alibaba provider defines the connection (conn type `oss`, extras `auth_type`,
`access_key_id`, `access_key_secret`, `region`, optional `endpoint`), but its OSSHook builds a
client of the V2 SDK, which our storage layer does not use. So this hook reads the Connection
itself and builds `trainer.storage.OssSettings`; the secret stays a SecretStr from here on and
is never logged (Airflow also masks connection extras whose names contain "secret").
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException

if TYPE_CHECKING:
    from imlt.trainer.storage import OssSettings


class ImltOssHook(BaseHook):
    """Reads an `oss` connection lazily (on first use, not in __init__: DAG parsing stays offline)."""

    conn_name_attr = "oss_conn_id"
    default_conn_name = "oss_default"
    hook_name = "imlt OSS credentials"

    def __init__(self, oss_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.oss_conn_id = oss_conn_id

    @cached_property
    def settings(self) -> OssSettings:
        """The connection as OssSettings; raises AirflowNotFoundException if it is not defined."""
        from imlt.trainer.storage import OssSettings

        conn = self.get_connection(self.oss_conn_id)
        extra = conn.extra_dejson
        auth_type = extra.get("auth_type", "AK")
        if auth_type != "AK":
            raise AirflowException(
                f"connection {self.oss_conn_id!r}: auth_type {auth_type!r} is not supported; use AK "
                "(extras access_key_id and access_key_secret)"
            )
        # The provider keeps the keys in extras; login/password is the generic fallback.
        key_id = extra.get("access_key_id") or conn.login
        secret = extra.get("access_key_secret") or conn.password
        if not key_id or not secret:
            raise AirflowException(
                f"connection {self.oss_conn_id!r}: set extras access_key_id and access_key_secret"
            )
        try:
            return OssSettings(
                endpoint=extra.get("endpoint"),
                region=extra.get("region"),
                access_key_id=key_id,
                access_key_secret=secret,
                session_token=extra.get("security_token") or extra.get("session_token"),
            )
        except ValueError as e:  # pydantic's message names the field, never the secret's value
            raise AirflowException(f"connection {self.oss_conn_id!r}: {e}") from e

    @classmethod
    def use_connection(cls, conn_id: str | None, urls: Iterable[Any] = ()) -> None:
        """Install a task's OSS credentials: the one way every imlt task (operators and the
        publish gate) gets them.

        conn_id None: the environment's OSS_* variables. A connection other than the default
        must exist. Without `oss_default`, a task about to touch an oss:// URL with no OSS_*
        credentials in its environment fails now, naming the connection, instead of failing
        later on a storage error that does not.
        """
        if conn_id is None:
            return
        hook = cls(oss_conn_id=conn_id)
        if hook.configure_storage(required=conn_id != cls.default_conn_name):
            return
        remote = [u for u in urls if isinstance(u, str) and u.startswith("oss://")]
        if remote and not os.environ.get("OSS_ACCESS_KEY_ID"):
            raise AirflowFailException(
                f"{remote[0]} needs OSS credentials: Airflow connection {conn_id!r} is not defined (create it: conn "
                "type oss, extras auth_type AK, access_key_id, access_key_secret, region, endpoint; see docs/airflow.md) "
                "and no OSS_ACCESS_KEY_ID is set in the environment"
            )

    def configure_storage(self, *, required: bool = False) -> bool:
        """Install the connection's credentials process-wide in trainer.storage.

        Returns False (and changes nothing) when the connection is not defined and not
        `required`: then the storage layer's own defaults (OSS_* environment variables) apply,
        which is what a deployment without OSS paths wants.
        """
        from imlt.trainer.storage import configure_oss

        try:
            settings = self.settings
        except AirflowNotFoundException:
            if required:
                raise
            self.log.info("No %r connection: OSS credentials come from the environment", self.oss_conn_id)
            return False
        configure_oss(settings)
        self.log.info(
            "OSS credentials from connection %r (region %s, endpoint %s)",
            self.oss_conn_id,
            settings.region,
            settings.endpoint,
        )
        return True
