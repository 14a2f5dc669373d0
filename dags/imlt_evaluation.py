"""Evaluation only: measure a trained or published model's Recall@K on an annotation file.

Triggered by hand with the model and annotation paths in the form (see dag_factory.evaluation_dag).
"""

from imlt.components.airflow.dag_factory import evaluation_dag

evaluation_dag("imlt_evaluation")
