"""Evaluate an existing model (e.g. a published version) on a dataset: read -> validate -> evaluate."""

from typing import List

from kfp import dsl

from imlt.components.kfp import evaluate, import_model, read_data, validate
from imlt.pipelines._platform import use_oss_secret


@dsl.pipeline(name="imlt-evaluation")
def evaluation_pipeline(
    model_url: str,
    annotations: str,
    data_format: str = "ClsSourceImageList",
    data_root: str = "",
    delimiter: str = " ",
    min_images_per_class: int = 2,
    ks: List[int] = [1, 2, 4, 8],
    batch_size: int = 64,
    reader_threads: int = 2,
    oss_secret_name: str = "oss-credentials",
) -> None:
    """Retrieval metrics (Recall@K, MAP@R) of an existing model on an annotated dataset.

    Args:
        model_url: Model folder, local or oss://: a published version (DEST/vN) or a train output.
        annotations: Annotation file of the query/gallery images, local or oss://.
        data_format: ClsSourceImageList or ClsSourceItag.
        data_root: Folder that relative image paths are joined to; default is the annotation file's folder.
        delimiter: Column delimiter of ClsSourceImageList lines.
        min_images_per_class: Validation fails for a class with fewer images.
        ks: The K values of Recall@K.
        batch_size: Images per embedding batch.
        reader_threads: DataLoader worker processes.
        oss_secret_name: Kubernetes Secret with access_key_id, access_key_secret, security_token (optional) and endpoint for oss:// URLs.
    """
    read = read_data(annotations=annotations, data_format=data_format, data_root=data_root, delimiter=delimiter,
                     split="eval").set_display_name("read annotations")
    read.set_caching_options(False)
    check = validate(dataset=read.outputs["dataset"], min_images_per_class=min_images_per_class).set_display_name("validate")
    model = import_model(model_url=model_url).set_display_name("import model")
    model.set_caching_options(False)
    scored = evaluate(model=model.outputs["model"], dataset=read.outputs["dataset"], ks=ks, batch_size=batch_size,
                      reader_threads=reader_threads).after(check).set_display_name("evaluate")
    for task in (read, check, model, scored):
        use_oss_secret(task, oss_secret_name)
