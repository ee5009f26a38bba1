"""The noise-aware classifier task: the classifier that guides a denoiser.

Trained with cross-entropy on x_t = q_sample(x_0, t) at uniform timesteps of the
denoiser's schedule (Dhariwal & Nichol 2021, Sec. 4). Point a denoiser's
`sample.classifier_workdir` at the run's workdir to guide with it; its raw
(non-EMA) parameters are used for guidance, as ADM's guided sampling does.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import diffusion
from ddpm_jax import timestep_sampling
from ddpm_jax.models import make_model_fn
from ddpm_jax.tasks import base


class ClassifierTask(base.SingleModelTask):
    """A noise-aware classifier (`model.name='classifier'`) as one part, 'model'."""
    name = 'classifier'

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        m = config.model
        if m.name != 'classifier':
            raise ValueError(f"task='classifier' needs model.name='classifier', got "
                             f'{m.name!r}.')
        if m.num_classes < 1:
            raise ValueError(f"task='classifier' needs model.num_classes >= 1, got "
                             f'{m.num_classes}.')

    def prepare_batch(self, batch, rng, task_state):
        del task_state
        t_rng, noise_rng = jax.random.split(rng)
        x0 = batch['image'].astype(jnp.float32)
        i, _ = timestep_sampling.sample_timesteps(t_rng, x0.shape[0],
                                                  self.sched.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        return {'x_t': diffusion.q_sample(self.sched, x0, i, noise), 'i': i,
                'label': batch['label'].astype(jnp.int32)}

    def loss(self, phase, params, examples, rng):
        del phase
        logits_fn = make_model_fn(self.model, params['model'], train=True,
                                  rngs={'dropout': rng}, pass_labels=False)
        logits = logits_fn(examples['x_t'], self.sched.timesteps[examples['i']])
        labels = examples['label']
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.mean(loss), {'loss': loss, 'accuracy': accuracy}
