"""What every step operator shares: OSS credentials, the step call, bad input as a hard failure.

Operators are thin adapters (see DESIGN.md): build the step's input model from templated
arguments, call trainer.steps, return the output model as JSON for XCom. trainer is imported
inside execute so that parsing a DAG file never loads the training stack.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from imlt.components.airflow.hooks.oss import ImltOssHook


class ImltStepOperator(BaseOperator):
    """Base of the five step operators.

    A subclass names its step (`step`, a function of trainer.steps, and `input_model`, its
    input class there) and returns the step's input fields from `step_fields`. `xcom_exclude`
    drops output fields that can be large (they stay in the step's output folder).
    `oss_conn_id=None` leaves OSS credentials to the environment. Each output field is also
    pushed as its own XCom (multiple_outputs), so `op.output["dataset_dir"]` feeds the next task.
    """

    step: ClassVar[str]
    input_model: ClassVar[str]
    xcom_exclude: ClassVar[frozenset[str]] = frozenset()
    ui_color = "#e8f1fb"

    def __init__(self, *, oss_conn_id: str | None = ImltOssHook.default_conn_name, **kwargs: Any) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.oss_conn_id = oss_conn_id

    @cached_property
    def hook(self) -> ImltOssHook | None:
        return None if self.oss_conn_id is None else ImltOssHook(oss_conn_id=self.oss_conn_id)

    def step_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the step; bad input fails the task without retries.

        DataError, ConfigError and pydantic's ValidationError are the user's to fix (their
        messages name the file and line, or the field), so retrying cannot help:
        AirflowFailException skips the remaining retries.
        """
        from pydantic import ValidationError

        from imlt.trainer import steps
        from imlt.trainer.config import ConfigError
        from imlt.trainer.errors import DataError

        if self.hook is not None:
            self.hook.configure_storage(required=self.oss_conn_id != ImltOssHook.default_conn_name)
        try:
            step = steps.STEPS[self.step]
            out = step(step.input_model.model_validate(self.step_fields()))
        except (DataError, ConfigError, ValidationError) as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e
        return out.model_dump(mode="json", exclude=set(self.xcom_exclude))
