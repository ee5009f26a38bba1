"""Tasks: the model families the one train loop trains, looked up by `config.task`.

See `ddpm_jax.tasks.base.Task` for the seam. `TASKS` is the registry:
'diffusion' (a denoiser of any parameterisation) and 'classifier' (a noise-aware
classifier for guidance).
"""

from collections.abc import Mapping

import ml_collections

from ddpm_jax.tasks.base import Task
from ddpm_jax.tasks.classifier import ClassifierTask
from ddpm_jax.tasks.diffusion import DiffusionTask

__all__ = ['TASKS', 'Task', 'ClassifierTask', 'DiffusionTask', 'create_task']

TASKS: Mapping[str, type[Task]] = {
    DiffusionTask.name: DiffusionTask,
    ClassifierTask.name: ClassifierTask,
}


def create_task(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names, built for `config`.

    Raises:
        ValueError: An unknown task name.
    """
    if config.task not in TASKS:
        raise ValueError(f'task={config.task!r} is not valid; choose one of {tuple(TASKS)}.')
    return TASKS[config.task](config)
