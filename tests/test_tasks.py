"""Tests for ddpm_jax.tasks: the diffusion task's sharded sampler and the task seam.

The samplers' maths is tested against closed forms in test_samplers.py; here the
references are the samplers called directly on `model.apply`, so what is checked
is the wiring: schedule and respacing, labels, the null label of classifier-free
guidance, the classifier gradient and sharding. The seam is shown by a two-part,
two-optimiser toy task defined here, trained, checkpointed and resumed through the
generic loop.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import data as data_lib
from ddpm_jax import parallel
from ddpm_jax import samplers
from ddpm_jax import state as state_lib
from ddpm_jax import tasks
from ddpm_jax import train
from ddpm_jax.models import create_model, example_inputs
from ddpm_jax.tasks import diffusion as diffusion_task
from conftest import make_classifier_config, make_conditional

BATCH = 4


@functools.cache
def _params(model, image_size, channels, seed=0):
    """Random parameters drawn on the host (an XLA-compiled `model.init` takes seconds).

    Kernels and embeddings ~ N(0, 1 / fan_in), norm scales 1, biases 0.1 N(0, 1):
    unlike the real init, no layer is zero, so every output (the UNet's eps and
    the classifier's logits) depends on its inputs.
    """
    x, t, kwargs = example_inputs(model, image_size, channels)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, **kwargs)['params']
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return np.ones(leaf.shape, leaf.dtype)
        if 'bias' in name:
            return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _model_and_params(config):
    model = create_model(config)
    return model, _params(model, config.data.image_size, config.data.channels)


def _one_device_mesh():
    return parallel.create_mesh(jax.devices()[:1])


def _direct_sample(config, make_model_fn, params, rng, labels, sampler=samplers.ddpm_sample,
                   **options):
    """The reference: `sampler` on `make_model_fn(params)`, jitted, on one device.

    Params and labels are arguments of the program (not baked-in constants), as in
    `make_sample_fn`, so both compile to the same arithmetic.
    """
    sched = diffusion_task.create_sampling_schedule(config)
    shape = (BATCH, config.data.image_size, config.data.image_size, config.data.channels)
    d, s = config.diffusion, config.sample

    def sample(p, r, y):
        out = sampler(make_model_fn(p), sched, shape, r, mean_type=d.mean_type,
                      var_type=d.var_type, clip_denoised=s.clip_denoised,
                      model_kwargs={'y': y}, **options)
        return jnp.clip(out, -1.0, 1.0)

    return np.asarray(jax.jit(sample)(params, rng, jnp.asarray(labels)))


def _unconditional_fn(model):
    return lambda p: (lambda x, t, y: model.apply({'params': p}, x, t, train=False))


# --- unconditional sampling ------------------------------------------------------------


def test_ddpm_sample_equals_direct_sampler_and_compiles_once(small_config):
    model, params = _model_and_params(small_config)
    sample_fn = diffusion_task.make_sample_fn(small_config, model, mesh=_one_device_mesh())
    labels = np.zeros(BATCH, np.int32)
    out = sample_fn(params, jax.random.key(0), labels)
    assert out.shape == (BATCH, 8, 8, 1) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), _direct_sample(
        small_config, _unconditional_fn(model), params, jax.random.key(0), labels))
    assert np.abs(np.asarray(sample_fn(params, jax.random.key(1), labels))
                  - np.asarray(out)).max() > 0.1
    assert sample_fn.jitted._cache_size() == 1  # Compiled once for two calls.


def test_ddim_respaced_equals_direct_sampler(small_config):
    small_config.sample.sampler = 'ddim'
    small_config.sample.respacing = 'ddim5'
    small_config.sample.eta = 0.5
    sched = diffusion_task.create_sampling_schedule(small_config)
    # T = 20 with 'ddim5' keeps every 4th original timestep.
    np.testing.assert_array_equal(np.asarray(sched.timesteps), [0, 4, 8, 12, 16])
    model, params = _model_and_params(small_config)
    sample_fn = diffusion_task.make_sample_fn(small_config, model, mesh=_one_device_mesh())
    labels = np.zeros(BATCH, np.int32)
    out = np.asarray(sample_fn(params, jax.random.key(0), labels))
    reference = _direct_sample(small_config, _unconditional_fn(model), params,
                               jax.random.key(0), labels, samplers.ddim_sample, eta=0.5)
    np.testing.assert_array_equal(out, reference)


def test_sharded_equals_single_device(small_config):
    model, params = _model_and_params(small_config)
    labels = np.zeros(BATCH, np.int32)
    rng = jax.random.key(0)
    sharded = diffusion_task.make_sample_fn(small_config, model, mesh=parallel.create_mesh())(
        params, rng, labels)
    single = diffusion_task.make_sample_fn(small_config, model, mesh=_one_device_mesh())(
        params, rng, labels)
    assert len(sharded.sharding.device_set) == 4 and len(single.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_batch_not_divisible_by_devices_raises(small_config):
    model, params = _model_and_params(small_config)
    sample_fn = diffusion_task.make_sample_fn(small_config, model, mesh=parallel.create_mesh())
    with pytest.raises(ValueError, match='multiple'):
        sample_fn(params, jax.random.key(0), np.zeros(3, np.int32))


# --- classifier-free guidance ----------------------------------------------------------


def test_guidance_scale_one_is_plainmake_conditional(small_config):
    config = make_conditional(small_config)
    model, params = _model_and_params(config)
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(3)
    out = diffusion_task.make_sample_fn(config, model, mesh=_one_device_mesh())(params, rng, labels)

    def make_model_fn(p):
        return lambda x, t, y: model.apply({'params': p}, x, t, y=y, train=False)

    # s = 1 skips the CFG wrapper: bit-for-bit the plain conditional sampler.
    np.testing.assert_array_equal(
        np.asarray(out), _direct_sample(config, make_model_fn, params, rng, labels))


def test_guidance_scale_combines_with_null_label(small_config):
    config = make_conditional(small_config)
    config.sample.guidance_scale = 3.0
    model, params = _model_and_params(config)
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(3)
    out = np.asarray(diffusion_task.make_sample_fn(config, model, mesh=_one_device_mesh())(
        params, rng, labels))

    def make_guided_fn(p):
        def guided_fn(x, t, y):
            # Ho & Salimans 2022, Eq. 6 with two separate calls; the null label is 3.
            cond = model.apply({'params': p}, x, t, y=y, train=False)
            uncond = model.apply({'params': p}, x, t, y=jnp.full_like(y, 3), train=False)
            return uncond + 3.0 * (cond - uncond)
        return guided_fn

    reference = _direct_sample(config, make_guided_fn, params, rng, labels)
    np.testing.assert_allclose(out, reference, atol=1e-4)


# --- classifier guidance ---------------------------------------------------------------


def test_classifier_guidance(small_config):
    model, params = _model_and_params(small_config)  # Unconditional denoiser.
    classifier = create_model(make_classifier_config(small_config))
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(0)
    mesh = parallel.create_mesh()
    unguided = np.asarray(diffusion_task.make_sample_fn(small_config, model, mesh=mesh)(
        params, rng, labels))

    small_config.sample.classifier_scale = 5.0
    with pytest.raises(ValueError, match='sample.classifier_scale'):
        diffusion_task.make_sample_fn(small_config, model)  # No classifier.
    guided_fn = diffusion_task.make_sample_fn(small_config, model, classifier=classifier, mesh=mesh)
    with pytest.raises(ValueError, match='classifier_params'):
        guided_fn(params, rng, labels)
    with pytest.raises(ValueError, match='labels must be in'):
        guided_fn(params, rng, np.array([0, 1, 2, 3], np.int32), {})

    # An all-zero classifier has zero gradient: exactly the unguided samples.
    cls_params = _params(classifier, 8, 1)
    zero_params = jax.tree.map(np.zeros_like, cls_params)
    np.testing.assert_array_equal(np.asarray(guided_fn(params, rng, labels, zero_params)),
                                  unguided)
    # A non-trivial classifier moves the samples.
    guided = np.asarray(guided_fn(params, rng, labels, cls_params))
    assert np.abs(guided - unguided).max() > 1e-3


def test_dpm_solver_respaced_equals_direct_sampler(small_config):
    small_config.sample.sampler = 'dpm_solver'
    small_config.sample.respacing = 'ddim5'
    model, params = _model_and_params(small_config)
    sample_fn = diffusion_task.make_sample_fn(small_config, model, mesh=_one_device_mesh())
    labels = np.zeros(BATCH, np.int32)
    out = np.asarray(sample_fn(params, jax.random.key(0), labels))
    reference = _direct_sample(small_config, _unconditional_fn(model), params,
                               jax.random.key(0), labels, samplers.dpm_solver_sample)
    np.testing.assert_array_equal(out, reference)


# --- the task seam: a two-part, two-optimiser task defined only here ----------------------


class _TwoPartTask(tasks.Task):
    """A 'generator' and a 'critic' (one weight vector each) with their own optimisers,
    updated alternately inside one step, critic first, as a GAN is (least-squares
    losses). Its task state counts steps, so resuming must carry it too."""
    name = 'two_part_toy'
    parts = ('generator', 'critic')
    ema_parts = ('generator',)
    phases = (('critic',), ('generator',))
    LEARNING_RATES = {'generator': 1e-2, 'critic': 1e-1}

    def init_params(self, rng):
        g_rng, c_rng = jax.random.split(rng)
        return {'generator': {'w': jax.random.normal(g_rng, (4,))},
                'critic': {'w': jax.random.normal(c_rng, (4,))}}

    def create_optimizers(self):
        rates = self.LEARNING_RATES
        return {'generator': state_lib.Optimizer(optax.adam(rates['generator']),
                                                 optax.constant_schedule(rates['generator'])),
                'critic': state_lib.Optimizer(optax.sgd(rates['critic']),
                                              optax.constant_schedule(rates['critic']))}

    def prepare_batch(self, batch, rng, task_state):
        real = batch['image'].reshape(batch['image'].shape[0], -1)[:, 20:24]  # [B, 4]
        return {'real': real, 'z': jax.random.normal(rng, real.shape)}

    @staticmethod
    def losses(phase, params, examples):
        fake = examples['z'] * params['generator']['w']
        real_score = examples['real'] @ params['critic']['w']
        fake_score = fake @ params['critic']['w']
        if phase == 0:
            return jnp.square(real_score - 1.0) + jnp.square(fake_score)
        return jnp.square(fake_score - 1.0)

    def loss(self, phase, params, examples, rng):
        per_example = self.losses(phase, params, examples)
        return jnp.mean(per_example), {'loss': per_example}

    def update_task_state(self, task_state, examples, terms):
        return task_state + 1


def _toy_config(tiny_config):
    config = tiny_config
    config.train.num_grid_samples = 0
    config.train.num_train_steps = 4
    config.train.checkpoint_every_steps = 2
    return config


def test_two_part_task_alternates_its_optimisers(tiny_config):
    """One step equals a critic SGD step followed by a generator Adam step that sees
    the updated critic."""
    config = _toy_config(tiny_config)
    task = _TwoPartTask(config)
    mesh = parallel.create_mesh(jax.devices()[:1])
    state = state_lib.create_sharded_train_state(task, jax.random.key(0), mesh)
    initial = parallel.to_host(state)
    batch = next(data_lib.create_train_iterator(config))
    step_fn = train.jit_train_step(train.make_train_step_fn(task, mesh), mesh)
    new_state, metrics = step_fn(state, parallel.to_global(batch, mesh), jax.random.key(1))
    new_state, metrics = parallel.to_host((new_state, metrics))

    # The same draws as the step: fold in step 0, split, prepare.
    rng = jax.random.fold_in(jax.random.key(1), 0)
    prepare_rng, _ = jax.random.split(rng)
    examples = task.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()}, prepare_rng,
                                  None)
    params = {part: {'w': np.asarray(tree['w'], np.float64)}
              for part, tree in initial.params.items()}
    real, z = np.asarray(examples['real'], np.float64), np.asarray(examples['z'], np.float64)
    g, c = params['generator']['w'], params['critic']['w']
    # Critic loss mean((real c - 1)^2 + ((z*g) c)^2): its gradient in c, then SGD.
    grad_c = np.mean(2 * (real @ c - 1)[:, None] * real + 2 * ((z * g) @ c)[:, None] * (z * g), 0)
    c1 = c - 0.1 * grad_c
    # Generator loss mean(((z*g) c1 - 1)^2) with the NEW critic; Adam's first step is
    # -lr * grad / (|grad| + eps) (bias-corrected moments).
    grad_g = np.mean(2 * ((z * g) @ c1 - 1)[:, None] * z * c1[None, :], 0)
    g1 = g - 1e-2 * grad_g / (np.abs(grad_g) + 1e-8)
    np.testing.assert_allclose(new_state.params['critic']['w'], c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.params['generator']['w'], g1, rtol=1e-5, atol=1e-6)
    assert set(new_state.ema_params[0]) == {'generator'}  # Only the generator's EMA.
    assert int(new_state.task_state) == 1
    assert metrics['learning_rate_critic'] == np.float32(0.1)
    np.testing.assert_allclose(metrics['loss_critic'], np.mean(
        np.square(real @ c - 1) + np.square((z * g) @ c)), rtol=1e-5)


def test_two_part_task_trains_checkpoints_and_resumes_bit_for_bit(tiny_config, tmp_path):
    config = _toy_config(tiny_config)
    mesh = parallel.create_mesh(jax.devices()[:1])
    reference = train.Trainer(config, mesh=mesh, task=_TwoPartTask(config)).train(
        str(tmp_path / 'reference'))
    trainer = train.Trainer(config, mesh=mesh, task=_TwoPartTask(config))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = train.Trainer(config, mesh=mesh, task=_TwoPartTask(config)).train(
        str(tmp_path / 'run'))
    assert int(resumed.step) == 4 and int(resumed.task_state) == 4
    chex.assert_trees_all_equal(parallel.to_host(resumed), parallel.to_host(reference))
    moved = np.abs(parallel.to_host(resumed.params['critic']['w'])
                   - parallel.to_host(trainer.init_state().params['critic']['w'])).max()
    assert moved > 1e-3
