"""Tasks: the model families the one train loop trains, looked up by `config.task`.

See `ddpm_jax.tasks.base.Task` for the seam. `TASKS` is the registry:
'diffusion' (a denoiser of any parameterisation), 'classifier' (a noise-aware
classifier for guidance) and 'ddgan' (a denoising diffusion GAN: a generator and a
discriminator with their own optimisers, alternating in one step).
"""

from collections.abc import Mapping

import ml_collections

from ddpm_jax.tasks.base import Task
from ddpm_jax.tasks.classifier import ClassifierTask
from ddpm_jax.tasks.ddgan import DDGANTask
from ddpm_jax.tasks.diffusion import DiffusionTask

__all__ = ['TASKS', 'Task', 'ClassifierTask', 'DDGANTask', 'DiffusionTask', 'create_task']

TASKS: Mapping[str, type[Task]] = {
    DiffusionTask.name: DiffusionTask,
    ClassifierTask.name: ClassifierTask,
    DDGANTask.name: DDGANTask,
}


def create_task(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names, built for `config`.

    Raises:
        ValueError: An unknown task name.
    """
    if config.task not in TASKS:
        raise ValueError(f'task={config.task!r} is not valid; choose one of {tuple(TASKS)}.')
    return TASKS[config.task](config)
