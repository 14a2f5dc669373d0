"""KFP component that brings an existing model folder (e.g. a published version) into a pipeline.

dsl.importer cannot be used for this: the Pipelines backend reads artifact URIs only from
its own object stores (gs://, s3://, minio://), and published models live on OSS.
"""

from imlt.components.kfp._factory import Io, step_component

import_model = step_component(
    "import_model",
    [Io("model", "dsl.Output[dsl.Model]", "The copied model folder; its metadata records model_url.", output=True)],
    summary="Copy a model folder from local or oss:// storage into a Model artifact.",
    step="import_model",
    bound=("output_dir",),
)
