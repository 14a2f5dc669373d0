"""KFP component over trainer.steps.import_weights: pretrained weights into the model store, once."""

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def import_weights(name: str, destination: str, backbone: str = "") -> str:
    """Fetch pretrained weights through timm and huggingface_hub and store them as safetensors + weights.json.

    Run it once where the Hugging Face Hub (or an HF_ENDPOINT mirror) is reachable; training
    pipelines on clusters without internet then set `pretrained` to the destination.

    Args:
        name: A timm tag (resnet50.a1_in1k), a backbone name for its default tag (resnet_50), or hf-hub:org/repo.
        destination: Folder (local or oss://) that receives model.safetensors and weights.json (source, tag, sha256).
        backbone: Backbone the weights must fit; empty: derived from name.

    Returns:
        Output: The value for the training pipeline's `pretrained` (the destination folder).
    """
    from imlt.trainer import steps

    out = steps.import_weights(steps.ImportWeightsInput(name=name, destination=destination, backbone=backbone or None))
    return out.pretrained
