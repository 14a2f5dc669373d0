"""KFP component over the train step; its training inputs are RunConfig's fields (see TRAIN_INPUTS).

Resources come from the task, not from parameters: in a pipeline call
`.set_cpu_limit()`, `.set_memory_limit()`, `.set_accelerator_type('nvidia.com/gpu')` and
`.set_accelerator_limit(n)` on the train task (pipelines/training.py derives them from an
instance type). `instance_type` and `gpu_type` are recorded in the config and model card.
"""

from imlt.components.kfp._factory import Io, kfp_input, step_component
from imlt.trainer.step_models import TrainInput, config_parameters, model_parameters

# The training inputs both train components share, built once from RunConfig and TrainInput.
TRAIN_INPUTS = [
    Io("train_dataset", "dsl.Input[dsl.Dataset]", "Train split from read_data."),
    Io("model", "dsl.Output[dsl.Model]", "The trained model folder: final weights, checkpoints, resolved config and its hash, per-epoch history, training curve.", output=True),
    Io("training_curve", "dsl.Output[dsl.HTML]", "Loss (and validation Recall@1) per epoch.", output=True),
    Io("val_metrics", "dsl.Output[dsl.Metrics]", "With a val split: the best epoch's val Recall@1 and MAP@R (recall_at_1, map_at_r, best_epoch); per-epoch lines are in the task log and history.json.", output=True),
    Io("val_dataset", "Optional[dsl.Input[dsl.Dataset]]", "Validation split from read_data; when connected, Recall@1 is tracked per epoch.", default="None"),
    *[kfp_input(p) for p in config_parameters()],
    *[kfp_input(p) for p in model_parameters(TrainInput, ("config", "train_dataset", "val_dataset"))],
]

train = step_component(
    "train",
    [
        *TRAIN_INPUTS,
        Io("output_dir", "Optional[str]", "Local or oss:// folder for checkpoints and the model; set it to a fixed folder so a retried task resumes. Default is the model artifact.", default="None"),
    ],
    summary="Train an image metric-learning model (timm backbone, embedding neck, margin loss).",
)
