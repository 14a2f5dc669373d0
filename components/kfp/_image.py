"""The container image every KFP component runs in, tagged with the installed package version.

Build it from the repository's Dockerfile (see docs/kfp.md). The tag follows the package
version so a compiled pipeline always names the image that holds the same trainer code.
"""

from importlib.metadata import version

IMAGE = f"ghcr.io/imlt/imlt:{version('imlt')}"
