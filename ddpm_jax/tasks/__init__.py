"""Tasks: the model families the one train loop trains, looked up by `config.task`.

See `ddpm_jax.tasks.base.Task` for the seam. `TASKS` is the registry:
'diffusion' (a denoiser of any parameterisation), 'classifier' (a noise-aware
classifier for guidance), 'ddgan' (a denoising diffusion GAN: a generator and a
discriminator with their own optimisers, alternating in one step), 'autoencoder' (the
first stage of latent diffusion: an autoencoder and a patch discriminator),
'latent_diffusion' (a denoiser on the latents of a frozen autoencoder) and
'super_resolution' (ADM-U: a denoiser conditioned on a low-resolution image); and
'score' (a continuous-time score model on a VP / sub-VP / VE SDE). `make_sample_fn`
builds the sampler of a task's model for sample mode, FID and grids.
"""

from collections.abc import Mapping

import ml_collections

from ddpm_jax.tasks.autoencoder import AutoencoderTask
from ddpm_jax.tasks.base import Task, config_schedule
from ddpm_jax.tasks.classifier import ClassifierTask
from ddpm_jax.tasks.ddgan import DDGANTask
from ddpm_jax.tasks.diffusion import DiffusionTask
from ddpm_jax.tasks.latent_diffusion import LatentDiffusionTask
from ddpm_jax.tasks.score import ScoreTask
from ddpm_jax.tasks import diffusion as _diffusion
from ddpm_jax.tasks import score as _score
from ddpm_jax.tasks.super_resolution import SuperResolutionTask

__all__ = ['TASKS', 'Task', 'AutoencoderTask', 'ClassifierTask', 'DDGANTask', 'DiffusionTask',
           'LatentDiffusionTask', 'ScoreTask', 'make_sample_fn', 'SuperResolutionTask', 'create_task',
           'config_schedule']

TASKS: Mapping[str, type[Task]] = {
    DiffusionTask.name: DiffusionTask,
    ClassifierTask.name: ClassifierTask,
    DDGANTask.name: DDGANTask,
    AutoencoderTask.name: AutoencoderTask,
    LatentDiffusionTask.name: LatentDiffusionTask,
    ScoreTask.name: ScoreTask,
    SuperResolutionTask.name: SuperResolutionTask,
}


def create_task(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names, built for `config`.

    Raises:
        ValueError: An unknown task name.
    """
    if config.task not in TASKS:
        raise ValueError(f'task={config.task!r} is not valid; choose one of {tuple(TASKS)}.')
    return TASKS[config.task](config)


def make_sample_fn(config: ml_collections.ConfigDict, model, **kwargs):
    """The sharded image sampler of `config.task`'s model: `tasks.score.make_sample_fn`
    for a score model (task='score'), `LatentDiffusionTask.make_sample_fn` (the
    autoencoder restored from `latent.autoencoder_workdir`; `model` unused) for
    task='latent_diffusion', else `tasks.diffusion.make_sample_fn`; keyword arguments
    `classifier`, `mesh` as theirs.

    Every returned `sample_fn(params, rng, labels, classifier_params=None, *,
    task_state=None, return_nfe=False)` takes the checkpoint's task state (see
    `checkpointing.restore_for_inference(..., with_task_state=True)`); only latent
    diffusion needs it (its measured latent scale)."""
    if config.task == ScoreTask.name:
        return _score.make_sample_fn(config, model, **kwargs)
    if config.task == LatentDiffusionTask.name:
        if kwargs.get('classifier') is not None:
            raise ValueError("task='latent_diffusion' has no classifier guidance.")
        return LatentDiffusionTask(config).make_sample_fn(kwargs.get('mesh'))
    return _diffusion.make_sample_fn(config, model, **kwargs)
