"""Measured comparisons; each module runs with `python -m benchmarks.<name>` and writes its section of RESULTS.md."""
