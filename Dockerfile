# The one image every KFP component, Kubeflow TrainJob pod and `imlt` CLI run uses.
# Tag it with the package version and compile the pipelines against it (docs/kfp.md):
#   docker build -t REGISTRY/imlt:VERSION . && docker push REGISTRY/imlt:VERSION
#   imlt kfp compile OUT_DIR --image REGISTRY/imlt:VERSION
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

WORKDIR /opt/imlt

# Only what the package installs; tests, benchmarks and the venv stay out (.dockerignore).
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY components ./components
COPY pipelines ./pipelines
COPY dags ./dags

# torch comes from PyPI (its Linux wheel carries the CUDA runtime, so one image serves CPU and
# GPU nodes); the kfp extra brings kfp (the component executor), kfp-kubernetes and the
# Kubeflow Trainer API. A regular (non-editable) install: the source folders are not needed
# at run time. `pip check` fails the build on a broken dependency set.
RUN pip install ".[kfp]" && pip check

# Runs as root: the KFP v2 launcher creates artifact mount points such as /minio/... and
# /s3/... at the filesystem root inside this container.
ENTRYPOINT ["imlt"]
CMD ["--help"]
