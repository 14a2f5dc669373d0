"""Step 1 as an operator: annotation file -> dataset folder."""

from __future__ import annotations

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import ReadDataInput


class ReadOssDataOperator(ImltStepOperator):
    """Parse an annotation file (local or oss://) into a dataset folder (the read_data step).

    Arguments (all templated): ReadDataInput's fields, e.g. output_dir, annotations,
    upstream_annotations, data_format, data_root, delimiter, class_names, multi_label, split.
    XCom: {"dataset_dir", "num_samples", "num_classes"}; the class list stays in classes.txt.
    """

    step = "read_data"
    input_model = ReadDataInput
    xcom_exclude = frozenset({"classes"})
