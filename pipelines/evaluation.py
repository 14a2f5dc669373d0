"""Evaluate an existing model (e.g. a published version) on a dataset: read -> validate -> evaluate.

Its inputs are the step models' fields (ImportModelInput, ReadDataInput, ValidateInput,
EvaluateInput), as the components see them.
"""

from typing import Any

from kfp import dsl

from imlt.components.kfp import evaluate, import_model, read_data, validate
from imlt.components.kfp._factory import kfp_input, with_interface
from imlt.pipelines._platform import OSS_SECRET_INPUT, retry_when_safe, set_step_resources, use_oss_secret
from imlt.trainer.step_models import EvaluateInput, ImportModelInput, ReadDataInput, ValidateInput, model_parameters


def _inputs() -> list:
    pick = [(ImportModelInput, ("model_url",)), (ReadDataInput, ("annotations", "data_format", "data_root", "delimiter")),
            (ValidateInput, ("min_images_per_class",)), (EvaluateInput, ("ks", "batch_size", "reader_threads"))]
    ios = [kfp_input(p, unset="empty") for model, names in pick for p in model_parameters(model) if p.name in names]
    # the annotation file is what this pipeline evaluates on: required here, unlike in read_data
    ios = [io if io.name != "annotations" else type(io)(io.name, "str", io.description) for io in ios]
    return [*ios, OSS_SECRET_INPUT]


def build_evaluation_pipeline(name: str = "imlt-evaluation") -> dsl.graph_component.GraphComponent:
    def body(p: dict[str, Any]) -> None:
        read = read_data(annotations=p["annotations"], data_format=p["data_format"], data_root=p["data_root"],
                         delimiter=p["delimiter"], split="eval").set_display_name("read annotations")
        read.set_caching_options(False)
        check = validate(dataset=read.outputs["dataset"], min_images_per_class=p["min_images_per_class"]).set_display_name("validate")
        model = import_model(model_url=p["model_url"]).set_display_name("import model")
        model.set_caching_options(False)
        scored = evaluate(model=model.outputs["model"], dataset=read.outputs["dataset"], ks=p["ks"],
                          batch_size=p["batch_size"], reader_threads=p["reader_threads"]).after(check).set_display_name("evaluate")
        set_step_resources(scored, "evaluate")
        for task in (read, check, model):
            set_step_resources(task)
        for task in (read, check, model, scored):
            retry_when_safe(task)  # all four only read their inputs and rewrite their own outputs
            use_oss_secret(task, p["oss_secret_name"])

    summary = "Retrieval metrics (Recall@K, MAP@R) of an existing model on an annotated dataset."
    return dsl.pipeline(name=name)(with_interface(body, "evaluation_pipeline", _inputs(), summary))


evaluation_pipeline = build_evaluation_pipeline()
