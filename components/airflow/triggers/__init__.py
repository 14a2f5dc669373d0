"""Triggers: waits that run in Airflow's triggerer instead of holding a worker slot."""

from imlt.components.airflow.triggers.train_job import TrainJobTrigger

__all__ = ["TrainJobTrigger"]
