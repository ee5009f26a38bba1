"""The denoising diffusion GAN task (Xiao et al. 2022): a conditional GAN per step.

A few large steps (T = 2..8 of the 'vp' schedule) replace the thousand small ones;
the reverse step is no longer Gaussian, so each is modelled by a conditional GAN:

* The generator G(x_t, z, t) (NCSN++ or a UNet with `model.latent_dim > 0`, part
  'generator')
  predicts x_0, squashed by tanh (`model.output_tanh`, as their NCSN++ generator)
  so training and sampling both see an x_0 in (-1, 1); the fake x_{t-1} is drawn
  from the Gaussian posterior q(x_{t-1} | x_t, x_0 = G(...)) of
  `diffusion.q_posterior_mean_variance`.
* The discriminator D(x_{t-1}, x_t, t) (`models.ddgan_discriminator`, the paper's,
  on the channel-concatenated pair, part 'discriminator') tells the real pair,
  (x_{t-1}, x_t) ~ q(x_{t-1}, x_t | x_0), from the fake one. Class-conditional
  models add a projection term of the label to D's logit.
* Each train step is two phases in one jitted step, as the paper's Algorithm 1:
  the discriminator's non-saturating loss softplus(-D(real)) + softplus(D(fake))
  plus the R1 penalty (r1_gamma / 2) E||grad_{x_{t-1}} D(real)||^2 (Mescheder et al.
  2018) on every `gan.lazy_reg`-th step (not rescaled, as DDGAN's code), then the
  generator's softplus(-D(fake)) against the updated discriminator, each with its
  own Adam. Each phase draws its own timesteps, pairs and latents. The EMA tracks
  the generator, which `samplers.ddgan_sample` runs (sampler 'ddgan').
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import control_flow
from ddpm_jax import diffusion
from ddpm_jax import state as state_lib
from ddpm_jax.models import create_model, example_inputs, make_model_fn
from ddpm_jax.models.ddgan_discriminator import DDGANDiscriminator, DISC_BLOCKS, DISC_INITS
from ddpm_jax.tasks import base
from ddpm_jax.tasks import diffusion as diffusion_task


def create_discriminator(config: ml_collections.ConfigDict) -> DDGANDiscriminator:
    """D(x_{t-1}, x_t, t, y): DDGAN's residual LeakyReLU discriminator over the pair
    stacked on channels (see `models.ddgan_discriminator`); label projection if the
    model is class-conditional."""
    g = config.gan
    return DDGANDiscriminator(base_channels=g.disc_base_channels,
                              channel_mult=tuple(g.disc_channel_mult),
                              downsample_first=g.disc_downsample_first,
                              temb_dim=g.disc_temb_dim,
                              num_classes=config.model.num_classes,
                              weight_init=g.disc_init, blocks=g.disc_blocks)


class DDGANTask(diffusion_task.DiffusionTask):
    """Generator and discriminator, alternating in one step (see the module docstring)."""
    name = 'ddgan'
    parts = ('generator', 'discriminator')
    ema_parts = ('generator',)
    phases = (('discriminator',), ('generator',))
    sample_part = 'generator'
    # DDGAN's EMA optimiser wrapper creates its average after the first step, from the
    # stepped parameters (e_1 = p_1); DDPM's and ADM's start theirs at the initial ones.
    ema_from_first_update = True

    def __init__(self, config: ml_collections.ConfigDict):
        base.Task.__init__(self, config)  # Not SingleModelTask's 'model' part.
        self.model = create_model(config)  # The generator: sample mode builds it so too.
        self.discriminator = create_discriminator(config)
        self.sched = base.config_schedule(config)
        self.loss_aware = False
        self.conditional = config.model.num_classes > 0

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        m, d, s, g = config.model, config.diffusion, config.sample, config.gan
        checks = [
            (m.name in base.DENOISER_MODELS, f"task='ddgan' needs model.name in "
                                             f'{base.DENOISER_MODELS}, got {m.name!r}.'),
            (m.latent_dim > 0, f'task=ddgan needs model.latent_dim > 0 (the generator '
                               f'latent z), got {m.latent_dim}.'),
            (not m.learn_sigma, 'task=ddgan needs model.learn_sigma=False.'),
            (m.class_dropout_prob == 0, 'task=ddgan has no classifier-free guidance: set '
                                        'model.class_dropout_prob=0.'),
            (d.mean_type == 'x0' and d.var_type == 'fixed_small',
             "task=ddgan's generator predicts x_0 and steps with the posterior: set "
             "diffusion.mean_type='x0' and diffusion.var_type='fixed_small'."),
            (d.timestep_sampling == 'uniform', 'task=ddgan samples timesteps uniformly: set '
                                               "diffusion.timestep_sampling='uniform'."),
            (s.sampler == 'ddgan', f"task=ddgan samples with sample.sampler='ddgan', got "
                                   f'{s.sampler!r}.'),
            (not s.respacing, f'sample.respacing={s.respacing!r}: a DDGAN samples with '
                              'exactly its training steps; set it to \'\'.'),
            (s.guidance_scale == 1.0 and s.classifier_scale == 0.0,
             'task=ddgan supports no guidance: set sample.guidance_scale=1 and '
             'sample.classifier_scale=0.'),
            (g.r1_gamma >= 0, f'gan.r1_gamma={g.r1_gamma} must be >= 0.'),
            (0 <= g.b1 < 1 and 0 <= g.b2 < 1,
             f'gan.b1={g.b1} and gan.b2={g.b2} must be in [0, 1).'),
            (g.lazy_reg >= 1, f'gan.lazy_reg={g.lazy_reg} must be >= 1.'),
            (g.lr_generator > 0 and g.lr_discriminator > 0,
             'gan.lr_generator and gan.lr_discriminator must be > 0.'),
            (config.optim.min_learning_rate < min(g.lr_generator, g.lr_discriminator),
             f'optim.min_learning_rate={config.optim.min_learning_rate} must be below '
             'gan.lr_generator and gan.lr_discriminator (the decay ends there).'),
            (g.disc_temb_dim >= 2, f'gan.disc_temb_dim={g.disc_temb_dim} must be >= 2.'),
            (g.disc_init in DISC_INITS,
             f'gan.disc_init={g.disc_init!r} must be one of {DISC_INITS}.'),
            (g.disc_blocks in DISC_BLOCKS,
             f'gan.disc_blocks={g.disc_blocks!r} must be one of {DISC_BLOCKS}.'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        base.check_denoiser_model(config)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        g_rng, d_rng = jax.random.split(rng)
        size, channels = self.config.data.image_size, self.config.data.channels
        x, t, kwargs = example_inputs(self.model, size, channels)
        generator = self.model.init({'params': g_rng, 'dropout': g_rng}, x, t, **kwargs)
        pair = jnp.zeros((1, size, size, 2 * channels), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
        disc = self.discriminator.init(d_rng, pair, jnp.zeros((1,), jnp.int32), labels)
        return {'generator': generator['params'], 'discriminator': disc['params']}

    def create_optimizers(self) -> dict[str, state_lib.Optimizer]:
        """Adam per network with the paper's betas and its own learning rate; the
        schedule (warmup, decay to `optim.min_learning_rate`) is `optim`'s."""
        out = {}
        for part, rate in (('generator', self.config.gan.lr_generator),
                           ('discriminator', self.config.gan.lr_discriminator)):
            optim = ml_collections.ConfigDict(self.config.optim.to_dict())
            optim.optimizer, optim.learning_rate = 'adam', rate
            optim.b1, optim.b2 = self.config.gan.b1, self.config.gan.b2
            out[part] = state_lib.create_optimizer(optim, self.config.train.num_train_steps)
        return out

    def init_task_state(self) -> jax.Array:
        return jnp.zeros((), jnp.int32)  # Steps taken: the lazy R1 schedule.

    def _draw_pairs(self, x0: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """(x_{i-1}, x_i) ~ q jointly at uniform step indices i (x_{-1} = x_0), plus the
        generator's latent and the posterior noise of the fake x_{i-1}."""
        i_rng, prev_rng, step_rng, z_rng, post_rng = jax.random.split(rng, 5)
        batch = x0.shape[0]
        num_steps = self.sched.num_timesteps
        i = jax.random.randint(i_rng, (batch,), 0, num_steps, jnp.int32)
        prev = diffusion.q_sample(self.sched, x0, jnp.maximum(i - 1, 0),
                                  jax.random.normal(prev_rng, x0.shape))
        prev = jnp.where((i > 0)[:, None, None, None], prev, x0)
        beta = diffusion.extract(self.sched.betas, i, x0.ndim)
        x_t = jnp.sqrt(1.0 - beta) * prev + jnp.sqrt(beta) * jax.random.normal(
            step_rng, x0.shape)
        return {'i': i, 'real_prev': prev, 'x_t': x_t,
                'z': jax.random.normal(z_rng, (batch, self.config.model.latent_dim)),
                'posterior_noise': jax.random.normal(post_rng, x0.shape)}

    def prepare_batch(self, batch, rng, task_state):
        d_rng, g_rng = jax.random.split(rng)
        x0 = batch['image'].astype(jnp.float32)
        examples = {'label': batch['label'].astype(jnp.int32)}
        for prefix, key in (('d_', d_rng), ('g_', g_rng)):
            examples.update({prefix + k: v for k, v in self._draw_pairs(x0, key).items()})
        lazy = self.config.gan.lazy_reg
        examples['r1_active'] = jnp.full((x0.shape[0],), task_state % lazy == 0)
        return examples

    def _fake_prev(self, params, examples, prefix, rng):
        """x_{i-1} ~ q(x_{i-1} | x_i, G(x_i, z, t_i)); exactly G's x_0 at i = 0."""
        i, x_t = examples[prefix + 'i'], examples[prefix + 'x_t']
        generator = make_model_fn(self.model, params['generator'], train=True,
                                  rngs={'dropout': rng}, pass_labels=self.conditional)
        x0 = generator(x_t, self.sched.timesteps[i], y=examples['label'] if self.conditional
                       else None, z=examples[prefix + 'z'])
        mean, _, log_var = diffusion.q_posterior_mean_variance(self.sched, x0, x_t, i)
        nonzero = (i > 0).astype(x_t.dtype)[:, None, None, None]
        return mean + nonzero * jnp.exp(0.5 * log_var) * examples[prefix + 'posterior_noise']

    def discriminator_logits(self, disc_params, prev, x_t, i, labels):
        """D(x_{i-1}, x_i, t_i) [B]: the logit of each example's class."""
        return self.discriminator.apply({'params': disc_params},
                                        jnp.concatenate([prev, x_t], axis=-1),
                                        self.sched.timesteps[i],
                                        labels if self.conditional else None)

    def r1_penalty(self, disc_params, prev, x_t, i, labels) -> jax.Array:
        """||grad_{x_{i-1}} D(x_{i-1}, x_i, t_i)||^2 per example, on real pairs."""
        grad = jax.grad(lambda p: jnp.sum(self.discriminator_logits(
            disc_params, p, x_t, i, labels)))(prev)
        return jnp.sum(jnp.square(grad), axis=tuple(range(1, grad.ndim)))

    def loss(self, phase, params, examples, rng):
        labels = examples['label']
        if phase == 0:  # The discriminator, against the current generator.
            i, x_t, real_prev = examples['d_i'], examples['d_x_t'], examples['d_real_prev']
            fake_prev = jax.lax.stop_gradient(self._fake_prev(params, examples, 'd_', rng))
            disc = params['discriminator']
            real = self.discriminator_logits(disc, real_prev, x_t, i, labels)
            fake = self.discriminator_logits(disc, fake_prev, x_t, i, labels)
            active = examples['r1_active'][0]
            # Skipped on inactive steps (on the CPU computed and masked: see control_flow).
            r1 = control_flow.cond(active, lambda: self.r1_penalty(disc, real_prev, x_t, i, labels),
                                   lambda: jnp.zeros_like(real))
            per_example = (jax.nn.softplus(-real) + jax.nn.softplus(fake)
                           + 0.5 * self.config.gan.r1_gamma * r1)
            terms = {'loss': per_example, 'd_real_accuracy': (real > 0).astype(jnp.float32),
                     'd_fake_accuracy': (fake < 0).astype(jnp.float32), 'r1': r1,
                     'd_real_logit': real, 'd_fake_logit': fake}
            return jnp.mean(per_example), terms
        # The generator, against the discriminator the first phase just updated.
        i, x_t = examples['g_i'], examples['g_x_t']
        fake_prev = self._fake_prev(params, examples, 'g_', rng)
        fake = self.discriminator_logits(params['discriminator'], fake_prev, x_t, i, labels)
        per_example = jax.nn.softplus(-fake)
        return jnp.mean(per_example), {'loss': per_example}

    def update_task_state(self, task_state, examples, terms):
        return task_state + 1

    def step_metrics(self, examples, terms):
        """D's accuracy on real and fake pairs (near 1 and 1: D wins, G collapses or
        stalls; near 0.5: balanced), mean logits, and the R1 penalty when computed."""
        d_terms = terms[0]
        metrics = {name: jnp.mean(d_terms[name]) for name in
                   ('d_real_accuracy', 'd_fake_accuracy', 'd_real_logit', 'd_fake_logit')}
        active = examples['r1_active'][0].astype(jnp.float32)
        # A sum with a count: a log window averages R1 over the steps that computed it
        # (logged as 'r1_lazy', see train.summarize_metrics).
        metrics['r1_lazy_sum'] = jnp.mean(d_terms['r1']) * active
        metrics['count_lazy'] = active
        return metrics
