"""KFP pipelines built from imlt.components.kfp, and their compiled YAML (`python -m imlt.pipelines.compile`)."""
