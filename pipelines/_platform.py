"""Kubernetes settings shared by the pipelines: OSS credentials and train-task resources.

kfp.local ignores these (it runs tasks as local processes), so the same pipeline runs
locally with OSS credentials taken from the environment.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from imlt.components.kfp._factory import Io
from imlt.trainer.config import INSTANCE_TYPES
from imlt.trainer.k8s import OSS_SECRET_KEYS as _SECRET_LAYOUT
from imlt.trainer.k8s import SHM_VOLUME, shm_size_limit

# The one Secret layout of the project (see trainer.k8s): its keys are the variable names.

# The pipeline input that names the Secret, shared by every pipeline.
OSS_SECRET_INPUT = Io(
    "oss_secret_name", "str",
    "Kubernetes Secret whose keys " + ", ".join(f"{var}{'' if required else ' (optional)'}" for var, required in _SECRET_LAYOUT)
    + " become every task's environment, for oss:// URLs.",
    default="'oss-credentials'",
)


def use_oss_secret(task: dsl.PipelineTask, secret_name: str | dsl.PipelineChannel) -> dsl.PipelineTask:
    """Expose the OSS credentials Secret as environment variables of a task.

    The Secret's required keys (OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET) are required: a task
    whose Secret is missing, or lacks one of them, does not start, and Kubernetes names the
    Secret and the key in the pod's status (CreateContainerConfigError), instead of the task
    starting without credentials and failing at its first oss:// read. The other keys are optional.
    """
    for required in (True, False):
        keys = {var: var for var, needed in _SECRET_LAYOUT if needed is required}
        kubernetes.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=keys, optional=not required)
    return task


# (cpu request, cpu limit, memory request, memory limit) of the tasks that are not training:
# reading and validating decode images in threads, evaluation embeds a split on CPU.
STEP_RESOURCES = {"small": ("1", "2", "2G", "4G"), "evaluate": ("2", "4", "4G", "8G")}


def set_step_resources(task: dsl.PipelineTask, size: str = "small") -> dsl.PipelineTask:
    """Requests and limits for a task that is not training: without them the scheduler packs
    pods by nothing and a busy node starves (or OOM-kills) them. Evaluation embeds with
    DataLoader workers, so it gets a /dev/shm of its own."""
    cpu_req, cpu_lim, mem_req, mem_lim = STEP_RESOURCES[size]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)
    return mount_shm(task, mem_lim) if size == "evaluate" else task


def mount_shm(task: dsl.PipelineTask, memory_limit: str) -> dsl.PipelineTask:
    """A memory-backed /dev/shm for a task whose DataLoader workers hand batches over through it.

    Kubernetes gives a container 64 MiB there, which one batch of 224 px images from 4 workers
    overflows ("unable to allocate shared memory"). Its size counts against the memory limit.
    """
    return kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                      size_limit=shm_size_limit(memory_limit))


def retry_when_safe(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Retry a task whose second attempt cannot do harm: its outputs are a function of its
    inputs (read, validate, evaluate), it resumes from its checkpoints (train, with a fixed
    train_output_dir), it re-attaches to its job (train_on_kubernetes: the job name is
    deterministic), or it is idempotent (publish: a second attempt finds the version its first
    one wrote, by the model's publish key, and returns it instead of publishing again)."""
    return task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)


def set_train_resources(task: dsl.PipelineTask, instance_type: str | None) -> dsl.PipelineTask:
    """CPU/memory/GPU of the train task: a modest CPU pod, or one node of an ECS instance type.

    Requests stay below the instance's size because a node's allocatable resources are
    smaller than its capacity (kubelet and system reservations); limits are the full size.
    The well-known label node.kubernetes.io/instance-type pins the pod to that node type.
    """
    if instance_type is None:
        task.set_cpu_request("2").set_cpu_limit("4").set_memory_request("8G").set_memory_limit("16G")
        return mount_shm(task, "16G")
    spec = INSTANCE_TYPES[instance_type]
    task.set_cpu_request(str(max(1, spec.cpu - 1))).set_cpu_limit(str(spec.cpu))
    task.set_memory_request(f"{int(spec.memory_gb * 0.8)}G").set_memory_limit(f"{spec.memory_gb}G")
    mount_shm(task, f"{spec.memory_gb}G")
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(spec.gpus)
    return kubernetes.add_node_selector(task, label_key="node.kubernetes.io/instance-type", label_value=instance_type)
