"""Airflow adapters, laid out like a provider: hooks/ (OSS credentials), operators/ (one per step).

Nothing here imports torch or timm at module level: DAG files that use these operators parse
fast. The trainer is imported inside each operator's execute.
"""
