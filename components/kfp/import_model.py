"""KFP component that brings an existing model folder (e.g. a published version) into a pipeline.

dsl.importer cannot be used for this: the Pipelines backend reads artifact URIs only from
its own object stores (gs://, s3://, minio://), and published models live on OSS.
"""

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def import_model(model_url: str, model: dsl.Output[dsl.Model]):
    """Copy a model folder from local or oss:// storage into a Model artifact.

    Args:
        model_url: A published version folder (DEST/vN) or a train output folder, local or oss://.

    Returns:
        model: The copied model folder; its metadata records model_url.
    """
    from imlt.trainer import steps

    steps.STEPS["import_model"](steps.ImportModelInput(model_url=model_url, output_dir=model.path))
    model.metadata["uri"] = model_url
