"""KFP pipelines built from components.kfp, and their compiled YAML (`python -m pipelines.compile`)."""
