"""KFP component over the import_weights step: pretrained weights into the model store, once.

Run it where the Hugging Face Hub (or an HF_ENDPOINT mirror) is reachable; training pipelines
on clusters without internet then set `pretrained` to its output.
"""

from imlt.components.kfp._factory import step_component

import_weights = step_component(
    "import_weights",
    [],
    summary="Fetch pretrained weights through timm and huggingface_hub; store model.safetensors + weights.json (source, tag, sha256).",
    step="import_weights",
    returns={"Output": "The value for the training pipeline's `pretrained` (the destination folder)."},
    return_annotation="str",
)
