"""The task seam: what differs between the model families the one train loop trains.

The generic loop (`ddpm_jax.train`) owns the mesh, the sharded state, the jitted
step, gradient accumulation, EMA, checkpoints, preemption, logging and sample
grids. A `Task` owns everything else:

* its parameter trees ("parts", e.g. `('model',)`, or `('generator',
  'discriminator')`) and how they are initialised and optimised (one optax
  optimiser per trainable part);
* its update `phases`: each phase is a tuple of parts updated jointly from one
  loss; several phases run one after the other inside the same jitted step (the
  alternating updates of a GAN), each seeing the parts as the previous phase left
  them. A part in no phase is frozen (e.g. a pretrained autoencoder);
* `prepare_batch`, which turns a data batch into the per-example inputs of its
  loss (noise, timesteps, dropped labels, or latents of an encoder: the model's
  input need not be a pixel image);
* `loss`, per phase; `update_task_state` for state carried between steps;
  `step_metrics` for what is logged; `make_grid_fn` for the periodic sample grids.

A new model family is a subclass registered in `ddpm_jax.tasks.TASKS` (or passed
to `train.Trainer(config, task=...)` directly).
"""

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import schedules
from ddpm_jax import state as state_lib
from ddpm_jax.models import create_model, example_inputs
from ddpm_jax.models import layers

Examples = dict[str, jax.Array]


def config_schedule(config: ml_collections.ConfigDict,
                    respacing: str | None = None) -> schedules.Schedule:
    """The schedule of `config.diffusion` (name, T and endpoints), optionally respaced."""
    d = config.diffusion
    return schedules.make_schedule(d.schedule, d.num_timesteps, respacing or None,
                                   beta_start=d.beta_start, beta_end=d.beta_end)


# The networks a denoiser, score model or DDGAN generator can be (`models.MODELS`).
DENOISER_MODELS = ('unet', 'ncsnpp')


def check_denoiser_model(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless config.model is a network of `DENOISER_MODELS` that the
    task can condition: NCSN++'s Fourier embedding (of log sigma) needs task='score'."""
    m = config.model
    if m.name not in DENOISER_MODELS:
        raise ValueError(f"task={config.task!r} needs model.name in {DENOISER_MODELS}, got "
                         f'{m.name!r}.')
    if m.name == 'ncsnpp' and m.ncsnpp.embedding_type == 'fourier' and config.task != 'score':
        raise ValueError("model.ncsnpp.embedding_type='fourier' embeds log sigma, which only "
                         f"task='score' feeds the network; task={config.task!r} feeds "
                         "timesteps: use 'positional'.")


class Task:
    """Base class of a model family trained by `ddpm_jax.train`.

    Attributes:
        config: The run's config.
        parts: Names of the parameter trees in `TrainState.params`.
        ema_parts: The parts whose EMAs are kept (and sampled from).
        phases: Parts updated together from one loss, in order, each step.
        sample_part: The part whose (EMA) parameters generate images (sample mode,
            FID, grids), or None for a task that does not generate (a classifier).
        ema_from_first_update: The EMAs start at the parameters after the first
            update (their first step takes decay 0) instead of at the initial ones.
    """
    name: ClassVar[str] = ''
    parts: tuple[str, ...] = ('model',)
    ema_parts: tuple[str, ...] = ('model',)
    phases: tuple[tuple[str, ...], ...] = (('model',),)
    sample_part: ClassVar[str | None] = None
    ema_from_first_update: ClassVar[bool] = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        """Task-specific config rules (`config_lib.validate` calls this); raises
        `ValueError` naming the field."""
        del config

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """The parts that appear in some phase, in `parts` order."""
        in_phases = {part for phase in self.phases for part in phase}
        return tuple(part for part in self.parts if part in in_phases)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """{part: parameter tree} for every part; pure (called under `jit`)."""
        raise NotImplementedError

    def create_optimizers(self) -> dict[str, state_lib.Optimizer]:
        """One optimiser per trainable part; by default each from `config.optim`."""
        optimizer = state_lib.create_optimizer(self.config.optim,
                                               self.config.train.num_train_steps)
        return {part: optimizer for part in self.trainable_parts}

    def init_task_state(self) -> Any:
        """State carried between steps besides the parameters (default: none)."""
        return jnp.zeros((), jnp.int32)

    def prepare_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array,
                      task_state: Any) -> Examples:
        """The per-example inputs of `loss` for the whole global batch.

        Drawn once per step, before the batch is split into accumulation
        micro-batches, so accumulation gives the same numbers as one big batch.

        Args:
            batch: {'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]}.
            rng: This step's key for the task's draws.
            task_state: `TrainState.task_state`.

        Returns:
            A dict of arrays whose leading axis is the batch.
        """
        del rng, task_state
        return dict(batch)

    def loss(self, phase: int, params: Mapping[str, Any], examples: Examples,
             rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar loss of phase `phase` and its per-example terms ([B] each).

        Differentiated with respect to the parts of `phases[phase]`; `params` holds
        every part. `rng` is distinct per phase and micro-batch (e.g. dropout).
        """
        raise NotImplementedError

    def update_task_state(self, task_state: Any, examples: Examples,
                          terms: tuple[dict[str, jax.Array], ...]) -> Any:
        """The task state after a step; `terms` holds each phase's per-example terms."""
        del examples, terms
        return task_state

    def step_metrics(self, examples: Examples,
                     terms: tuple[dict[str, jax.Array], ...]) -> dict[str, jax.Array]:
        """Scalars to log besides loss, gradient norm and learning rate.

        A key `<name>_<group>_sum` with a matching `count_<group>` is averaged over
        the counts when a log window is summarised (see `train.summarize_metrics`);
        other keys are averaged over steps. Default: the mean of every term but 'loss'.
        """
        del examples
        metrics = {}
        for phase_terms in terms:
            for name, value in phase_terms.items():
                if name != 'loss':
                    metrics[name] = jnp.mean(value)
        return metrics

    def make_grid_fn(self, mesh: jax.sharding.Mesh, rng: jax.Array
                     ) -> Callable[[Mapping[str, Any], Any], tuple[Any, int]] | None:
        """`grid_fn(ema_params, task_state) -> (images, columns)` for the periodic
        sample grid, from the chosen EMA parameters ({part: tree}) and the task state
        (e.g. a measured latent scale, or stored input images to reconstruct); images
        a float32 [N, H, W, C] array in [-1, 1] on the host, the same on every
        process (all processes call it). None for no grids. Built once per trainer,
        so it compiles once; `rng` is the grids' key."""
        del mesh, rng
        return None


class SingleModelTask(Task):
    """A task of one network, `config.model`, as the part 'model', on the diffusion
    schedule of `config.diffusion` (the denoiser and the noise-aware classifier).

    Attributes:
        model: The Flax module (`models.create_model(config)`).
        sched: The training schedule.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = create_model(config)
        self.sched = config_schedule(config)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        return {'model': self.init_model(rng, self.config.data.image_size,
                                         self.config.data.channels)}

    def init_model(self, rng: jax.Array, image_size: int, channels: int) -> Any:
        """The network's parameters for `image_size` x `channels` inputs; with
        `model.bias_init='torch'` its biases as PyTorch starts them
        (`layers.torch_default_biases`)."""
        x, t, kwargs = example_inputs(self.model, image_size, channels)
        params_rng, dropout_rng = jax.random.split(rng)
        variables = self.model.init({'params': params_rng, 'dropout': dropout_rng}, x, t,
                                    **kwargs, train=False)
        params = variables['params']
        if self.config.model.bias_init == 'torch':
            params = layers.torch_default_biases(params, jax.random.fold_in(params_rng, 1))
        return params
