"""The one definition of the container image every KFP component, pipeline and job pod runs.

Default: the project repository tagged with the installed package version, so a compiled
pipeline or a rendered job names the image holding the same trainer code. A deployment that
builds and pushes its own image (docs/kfp.md) points everything at it with the IMLT_IMAGE
environment variable, or with `imlt kfp compile --image REGISTRY/imlt:TAG` when compiling.
"""

from __future__ import annotations

import os

REPOSITORY = "ghcr.io/imlt/imlt"
ENV = "IMLT_IMAGE"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imlt")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "latest"


def default_image() -> str:
    """The project image of this package version (IMLT_IMAGE not considered)."""
    return f"{REPOSITORY}:{package_version()}"


def project_image() -> str:
    """The image to use: IMLT_IMAGE when set, else the project image of this package version."""
    return os.environ.get(ENV) or default_image()
