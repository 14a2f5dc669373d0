"""Compile every pipeline to YAML next to this file: `python -m imlt.pipelines.compile [OUT_DIR]`.

The YAML files are committed so the Pipelines UI can upload them without a Python setup;
tests/test_kfp_pipelines.py fails when they are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kfp import compiler

from imlt.pipelines.evaluation import evaluation_pipeline
from imlt.pipelines.training import training_pipeline, training_pipeline_distributed, training_pipeline_gpu

PIPELINES = {
    "training_pipeline.yaml": training_pipeline,
    "training_pipeline_gpu.yaml": training_pipeline_gpu,
    "training_pipeline_distributed.yaml": training_pipeline_distributed,
    "evaluation_pipeline.yaml": evaluation_pipeline,
}


def compile_all(out_dir: str | Path = Path(__file__).parent) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, pipeline in PIPELINES.items():
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(out_dir / filename))
        written.append(out_dir / filename)
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for path in compile_all(*args[:1]):
        print(path)


if __name__ == "__main__":
    main()
