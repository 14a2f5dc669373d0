"""Retraining: read -> validate -> train -> evaluate -> publish if the model is better.

Publishes only when Recall@1 on the validation split beats both the floor
(`min_recall_at_1`) and the model currently published at DESTINATION/latest (none published:
the floor alone decides). This DAG has no schedule and no data settings: trigger it with the
paths in the form. For a scheduled retraining, write your own DAG file with your data:

    from imlt.components.airflow.dag_factory import retraining_dag
    retraining_dag("products_daily", "@daily", train_annotations="oss://bkt/products/train.txt",
                   val_annotations="oss://bkt/products/val.txt", destination="oss://bkt/models/products",
                   output_root="oss://bkt/imlt-runs/products")

No torch/timm import here or in the operators: the scheduler parses this file often.
"""

from imlt.components.airflow.dag_factory import retraining_dag

retraining_dag("imlt_retraining", schedule=None)
