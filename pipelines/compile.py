"""Compile every pipeline to YAML: `imlt kfp compile [OUT_DIR] [--image REGISTRY/imlt:TAG]`
(or `python -m imlt.pipelines.compile ...`).

The YAML files next to this module are committed (compiled against the default image, the
project image of this package version) so the Pipelines UI can upload them without a Python
setup; tests/test_kfp_pipelines.py fails when they are stale. A deployment that pushes its own
image compiles against it with --image (or IMLT_IMAGE set before importing the components);
every component, and the Kubernetes jobs the train_on_kubernetes task submits, then run it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from kfp import compiler

import imlt.components.kfp as kfp_components
from imlt.pipelines.evaluation import build_evaluation_pipeline
from imlt.pipelines.training import VARIANTS, build_training_pipeline

DEFAULT_OUT = Path(__file__).parent

# file name -> builder; built at compile time so that the components' image is the one asked for
PIPELINES: dict[str, Callable[[], Any]] = {
    **{f"{name}.yaml": partial(build_training_pipeline, **kw) for name, kw in VARIANTS.items()},
    "evaluation_pipeline.yaml": build_evaluation_pipeline,
}


@contextmanager
def components_on(image: str | None) -> Iterator[None]:
    """Every component runs `image` inside the block (None: leave them as they are)."""
    components = [getattr(kfp_components, name) for name in kfp_components.__all__]
    containers = [c.component_spec.implementation.container for c in components]
    before = [c.image for c in containers]
    try:
        if image:
            for container in containers:
                container.image = image
        yield
    finally:
        for container, old in zip(containers, before):
            container.image = old


def compile_all(out_dir: str | Path = DEFAULT_OUT, image: str | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with components_on(image):
        for filename, build in PIPELINES.items():
            compiler.Compiler().compile(pipeline_func=build(), package_path=str(out_dir / filename))
            written.append(out_dir / filename)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="imlt kfp compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT), help="folder for the YAML files")
    parser.add_argument("--image", help="image every component runs, e.g. registry.cn-hangzhou.aliyuncs.com/team/imlt:0.1.0")
    args = parser.parse_args(argv)
    for path in compile_all(args.out_dir, args.image):
        print(path)


if __name__ == "__main__":
    main()
