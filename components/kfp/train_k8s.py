"""KFP component over the train_remote step: the training runs as a Kubernetes job, not in this pod.

Same training inputs and outputs as `train` (TRAIN_INPUTS), plus RemoteTrainInput's job fields.
The task submits a Kubeflow Trainer v2 TrainJob (or a legacy PyTorchJob) and waits for it,
streaming node 0's log into the task's log; a retried task renders the same job name and
re-attaches to the job instead of starting another.

Resources: set them on the task as for `train` (`.set_cpu_limit()`, `.set_memory_limit()`,
`.set_accelerator_type()`, `.set_accelerator_limit()`, a node selector). The component declares
`task_config_passthroughs` for RESOURCES and KUBERNETES_NODE_SELECTOR without applying them to the
task: KFP hands them to the component in `task_config`, they become each node's resources and
node selector, and this pod itself stays small and schedules anywhere. Without task settings,
the config's instance_type (or gpu_type and nproc_per_node) sizes the nodes.

The task needs a service account allowed to create, get and delete trainjobs (or pytorchjobs)
and to list pods and read their logs in the job's namespace (docs/kfp.md).
"""

from kfp import dsl

from imlt.components.kfp._factory import Io, kfp_input, step_component
from imlt.components.kfp.train import TRAIN_INPUTS
from imlt.trainer.step_models import RemoteTrainInput, model_parameters

# resources and node_selector come from the task's settings (task_config), the rest are inputs
JOB_FIELDS = model_parameters(RemoteTrainInput, ("config", "train_dataset", "val_dataset", "resume", "resources", "node_selector"))

train_on_kubernetes = step_component(
    "train_on_kubernetes",
    [
        *TRAIN_INPUTS,
        Io("output_dir", "Optional[str]", "Required: the oss:// folder (or a volume every pod mounts at the same path) the job writes checkpoints and the model to, and reads its config and staged datasets from; a retried task re-attaches to its job and resumes from here.", default="None"),
        *[kfp_input(p) for p in JOB_FIELDS],
        Io("task_config", "dsl.TaskConfig", "Filled by KFP: the task's resources and node selector, passed through to the job's nodes.", default="None"),
    ],
    summary="Train an image metric-learning model as a Kubernetes job (Kubeflow TrainJob) and wait for it.",
    task_config_passthroughs=[
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.RESOURCES, apply_to_task=False),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR, apply_to_task=False),
    ],
)
