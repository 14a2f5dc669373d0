"""What every step operator shares: its arguments derived from the step's input model, OSS
credentials, the step call, bad input as a hard failure.

Operators are thin adapters (see DESIGN.md): build the step's input model from templated
arguments, call the step through trainer.steps' registry, return the output model as JSON for
XCom. A subclass names its step; its constructor arguments, their defaults and its
template_fields come from that step's input model (trainer.step_models), so a field added
there is an operator argument without editing the operator. trainer.step_models imports only
the config (no torch): DAG files that use these operators still parse fast.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from imlt.components.airflow.hooks.oss import ImltOssHook
from imlt.trainer.step_models import Parameter, StepModel, model_parameters


class ImltStepOperator(BaseOperator):
    """Base of the step operators.

    A subclass sets `step` (a name in trainer.steps.STEPS), `input_model` (that step's input
    class) and, where an argument is not a plain field, `extra_fields` (templated arguments of
    its own) and `not_fields` (input fields it builds itself in `step_fields`). `xcom_exclude`
    drops output fields that can be large (they stay in the step's output folder).
    `oss_conn_id=None` leaves OSS credentials to the environment. Each output field is also
    pushed as its own XCom (multiple_outputs), so `op.output["dataset_dir"]` feeds the next task.
    """

    step: ClassVar[str]
    input_model: ClassVar[type[StepModel]]
    not_fields: ClassVar[tuple[str, ...]] = ()
    extra_fields: ClassVar[dict[str, Any]] = {}  # name -> default
    xcom_exclude: ClassVar[frozenset[str]] = frozenset()
    parameters: ClassVar[list[Parameter]] = []
    ui_color = "#e8f1fb"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "input_model" in cls.__dict__ or "not_fields" in cls.__dict__:
            # the model's own fields; a RunConfig field stays one argument (`config`)
            cls.parameters = model_parameters(cls.input_model, cls.not_fields, flatten=False)
        cls.template_fields = (*(p.name for p in cls.parameters), *cls.extra_fields)

    def __init__(self, *, oss_conn_id: str | None = ImltOssHook.default_conn_name, **kwargs: Any) -> None:
        mine = {p.name for p in self.parameters} | set(self.extra_fields)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in mine}
        missing = [p.name for p in self.parameters if p.required and p.name not in given]
        if missing:
            raise TypeError(f"{type(self).__name__}: missing required argument(s) {', '.join(missing)}")
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.oss_conn_id = oss_conn_id
        for p in self.parameters:
            setattr(self, p.name, given.get(p.name, p.default))
        for name, default in self.extra_fields.items():
            setattr(self, name, given.get(name, default))

    def step_fields(self) -> dict[str, Any]:
        """The step input's fields from the (rendered) arguments.

        None for a field that cannot be None means "the step's default" (an unset DAG param
        renders as None); "" and {} for a nullable field mean None.
        """
        out = {}
        for p in self.parameters:
            value = getattr(self, p.name)
            if p.nullable and value in ("", {}):
                value = None
            if value is not None or p.nullable:
                out[p.name] = value
        return out

    def step_input(self) -> Any:
        """The validated step input; bad input fails the task without retries.

        DataError, ConfigError and pydantic's ValidationError are the user's to fix (their
        messages name the file and line, or the field), so retrying cannot help:
        AirflowFailException skips the remaining retries.
        """
        from pydantic import ValidationError

        from imlt.trainer.config import ConfigError
        from imlt.trainer.errors import DataError

        try:
            return self.input_model.model_validate(self.step_fields())
        except (DataError, ConfigError, ValidationError) as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e

    def configure_storage(self) -> None:
        """OSS credentials for this task, the one way every imlt task gets them (ImltOssHook.use_connection)."""
        values = [getattr(self, p.name) for p in self.parameters]
        if isinstance(getattr(self, "config", None), dict):
            values.append(self.config.get("output_dir"))
        ImltOssHook.use_connection(self.oss_conn_id, values)

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the step; bad input (see step_input) fails the task without retries."""
        from imlt.trainer import steps
        from imlt.trainer.config import ConfigError
        from imlt.trainer.errors import DataError

        self.configure_storage()
        inp = self.step_input()
        try:
            out = steps.STEPS[self.step](inp)
        except (DataError, ConfigError) as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e
        return out.model_dump(mode="json", exclude=set(self.xcom_exclude))
