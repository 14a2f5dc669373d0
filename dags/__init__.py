"""Airflow DAG files over imlt.components.airflow (imported as imlt.dags; also usable as a DAGs folder)."""
