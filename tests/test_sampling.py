"""Tests for ddpm_jax.sampling: the sharded sampler, guidance wiring and --mode=sample.

The samplers' maths is tested against closed forms in test_samplers.py; here the
references are the samplers called directly on `model.apply`, so what is checked
is the wiring: schedule and respacing, labels, the null label of classifier-free
guidance, the classifier gradient, sharding and the files written.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest

from ddpm_jax import parallel
from ddpm_jax import samplers
from ddpm_jax import sampling
from ddpm_jax.models import create_model, example_inputs

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


@pytest.fixture
def small_config(tiny_config):
    """tiny_config with a one-level UNet without attention: quick to compile.

    The architecture is tested elsewhere; here only the wiring around it matters.
    """
    tiny_config.model.channel_mult = (1,)
    tiny_config.model.attention_resolutions = ()
    return tiny_config


def _model_and_params(config):
    model = create_model(config)
    return model, _params(model, config.data.image_size, config.data.channels)


def _one_device_mesh():
    return parallel.create_mesh(jax.devices()[:1])


def _conditional(config, num_classes=3, class_dropout_prob=0.1):
    config.model.num_classes = num_classes
    config.model.class_dropout_prob = class_dropout_prob
    return config


def _classifier_config(config, num_classes=3):
    config = ml_collections.ConfigDict(config.to_dict())  # A copy.
    config.model.name = 'classifier'
    config.model.num_classes = num_classes
    config.model.class_dropout_prob = 0.0
    config.model.pool = 'adaptive'
    return config


def _direct_sample(config, make_model_fn, params, rng, labels):
    """The reference: samplers.ddpm_sample on `make_model_fn(params)`, jitted.

    Params and labels are arguments of the program (not baked-in constants), as in
    `make_sample_fn`, so both compile to the same arithmetic.
    """
    sched = sampling.create_sampling_schedule(config)
    shape = (BATCH, config.data.image_size, config.data.image_size, config.data.channels)
    d, s = config.diffusion, config.sample

    def sample(p, r, y):
        out = samplers.ddpm_sample(
            make_model_fn(p), sched, shape, r, mean_type=d.mean_type, var_type=d.var_type,
            clip_denoised=s.clip_denoised, model_kwargs={'y': y})
        return jnp.clip(out, -1.0, 1.0)

    return np.asarray(jax.jit(sample)(params, rng, jnp.asarray(labels)))


# --- unconditional sampling ------------------------------------------------------------


def test_ddpm_sample_shape_range_and_determinism(small_config):
    model, params = _model_and_params(small_config)
    sample_fn = sampling.cached_sample_fn(small_config, model, parallel.create_mesh())
    labels = np.zeros(BATCH, np.int32)
    out = sample_fn(params, jax.random.key(0), labels)
    assert out.shape == (BATCH, 8, 8, 1) and out.dtype == jnp.float32
    assert len(out.sharding.device_set) == jax.device_count() == 4
    host = np.asarray(out)
    assert np.all(host >= -1.0) and np.all(host <= 1.0)
    assert host.std() > 0.05  # Not a constant image.
    np.testing.assert_array_equal(np.asarray(sample_fn(params, jax.random.key(0), labels)),
                                  host)
    assert np.abs(np.asarray(sample_fn(params, jax.random.key(1), labels)) - host).max() > 0.1
    assert sample_fn.jitted._cache_size() == 1  # Compiled once for three calls.
    # The same function (and program) comes back from the cache.
    assert sampling.cached_sample_fn(small_config, model, parallel.create_mesh()) is sample_fn


def test_ddim_respaced(small_config):
    small_config.sample.sampler = 'ddim'
    small_config.sample.respacing = 'ddim5'
    sched = sampling.create_sampling_schedule(small_config)
    # T = 20 with 'ddim5' keeps every 4th original timestep.
    np.testing.assert_array_equal(np.asarray(sched.timesteps), [0, 4, 8, 12, 16])
    model, params = _model_and_params(small_config)
    sample_fn = sampling.make_sample_fn(small_config, model)
    labels = np.zeros(BATCH, np.int32)
    out = np.asarray(sample_fn(params, jax.random.key(0), labels))
    assert out.shape == (BATCH, 8, 8, 1) and out.dtype == np.float32
    assert np.all(np.abs(out) <= 1.0) and out.std() > 0.05
    np.testing.assert_array_equal(np.asarray(sample_fn(params, jax.random.key(0), labels)),
                                  out)
    assert np.abs(np.asarray(sample_fn(params, jax.random.key(1), labels)) - out).max() > 0.1


def test_sharded_equals_single_device(small_config):
    model, params = _model_and_params(small_config)
    labels = np.zeros(BATCH, np.int32)
    rng = jax.random.key(0)
    sharded = sampling.cached_sample_fn(small_config, model, parallel.create_mesh())(
        params, rng, labels)
    single = sampling.make_sample_fn(small_config, model, mesh=_one_device_mesh())(
        params, rng, labels)
    assert len(sharded.sharding.device_set) == 4 and len(single.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_batch_not_divisible_by_devices_raises(small_config):
    model, params = _model_and_params(small_config)
    sample_fn = sampling.cached_sample_fn(small_config, model, parallel.create_mesh())
    with pytest.raises(ValueError, match='multiple'):
        sample_fn(params, jax.random.key(0), np.zeros(3, np.int32))


# --- classifier-free guidance ----------------------------------------------------------


def test_guidance_scale_one_is_plain_conditional(small_config):
    config = _conditional(small_config)
    model, params = _model_and_params(config)
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(3)
    out = sampling.make_sample_fn(config, model, mesh=_one_device_mesh())(params, rng, labels)

    def make_model_fn(p):
        return lambda x, t, y: model.apply({'params': p}, x, t, y=y, train=False)

    # s = 1 skips the CFG wrapper: bit-for-bit the plain conditional sampler.
    np.testing.assert_array_equal(
        np.asarray(out), _direct_sample(config, make_model_fn, params, rng, labels))


def test_guidance_scale_combines_with_null_label(small_config):
    config = _conditional(small_config)
    config.sample.guidance_scale = 3.0
    model, params = _model_and_params(config)
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(3)
    out = np.asarray(sampling.make_sample_fn(config, model, mesh=_one_device_mesh())(
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


@pytest.mark.parametrize('num_classes, class_dropout_prob', [(3, 0.0), (0, 0.0)])
def test_guidance_without_null_label_raises(small_config, num_classes, class_dropout_prob):
    config = _conditional(small_config, num_classes, class_dropout_prob)
    config.sample.guidance_scale = 2.0
    with pytest.raises(ValueError, match='sample.guidance_scale=2.0'):
        sampling.make_sample_fn(config, create_model(config))


# --- classifier guidance ---------------------------------------------------------------


class _LinearClassifier(nn.Module):
    """logits = flatten(x) @ W: its log-softmax gradient has a closed form."""
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, t, train=False):
        del t, train
        return nn.Dense(self.num_classes, use_bias=False,
                        kernel_init=nn.initializers.normal(0.5))(x.reshape(x.shape[0], -1))


def test_classifier_cond_fn_matches_closed_form():
    classifier = _LinearClassifier()
    x = jax.random.normal(jax.random.key(0), (5, 2, 2, 1))
    params = classifier.init(jax.random.key(1), x, jnp.zeros(5, jnp.int32))['params']
    y = np.array([0, 1, 2, 1, 0], np.int32)
    grad = sampling.make_classifier_cond_fn(classifier, params)(
        x, jnp.zeros(5, jnp.int32), y=jnp.asarray(y))
    # d/dx log softmax(x W)[y] = W[:, y] - sum_k softmax_k W[:, k].
    w = np.asarray(params['Dense_0']['kernel'], np.float64)  # [4, 3]
    xf = np.asarray(x, np.float64).reshape(5, -1)
    logits = xf @ w
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = w[:, y].T - probs @ w.T
    np.testing.assert_allclose(np.asarray(grad).reshape(5, -1), expected, rtol=1e-5,
                               atol=1e-6)


def test_classifier_guidance(small_config):
    model, params = _model_and_params(small_config)  # Unconditional denoiser.
    classifier = create_model(_classifier_config(small_config))
    labels = np.array([0, 1, 2, 0], np.int32)
    rng = jax.random.key(0)
    mesh = parallel.create_mesh()
    unguided = np.asarray(sampling.cached_sample_fn(small_config, model, mesh)(
        params, rng, labels))

    small_config.sample.classifier_scale = 5.0
    with pytest.raises(ValueError, match='sample.classifier_scale'):
        sampling.make_sample_fn(small_config, model)  # No classifier.
    guided_fn = sampling.make_sample_fn(small_config, model, classifier=classifier, mesh=mesh)
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
    assert np.all(np.abs(guided) <= 1.0)


# --- --mode=sample end to end ----------------------------------------------------------


def test_sample_and_save_end_to_end(small_config, tmp_path):
    from ddpm_jax import train

    config = _conditional(small_config, num_classes=10)  # The digits' classes.
    config.train.num_train_steps = 2
    config.train.checkpoint_every_steps = 2
    config.train.num_grid_samples = 4
    workdir = str(tmp_path / 'run')
    train.train_and_evaluate(config, workdir)
    # The trainer wrote its final grid through sampling.write_sample_grid.
    grid = np.asarray(PIL.Image.open(tmp_path / 'run' / 'samples' / 'step_2.png'))
    # 4 images, 4x upscaled 8x8 -> 32 px, 2 columns (10 classes do not fit) and 1 px gaps.
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1)

    config.sample.num_images = 6  # Two batches of 4, the second padded.
    config.sample.global_batch_size = 4
    result = sampling.sample_and_save(config, workdir)
    assert result['step'] == 2
    with np.load(result['npz']) as f:
        images, labels = f['images'], f['labels']
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert labels.dtype == np.int32 and labels.shape == (6,)
    assert np.all((labels >= 0) & (labels < 10))
    assert images.std() > 1.0  # Not blank.
    png = np.asarray(PIL.Image.open(result['png']))
    assert png.shape == (2 * 33 + 1, 3 * 33 + 1)  # 6 images in 3 columns.

    # A fixed label, and the same images for the same config (seeded).
    config.sample.label = 7
    again = sampling.sample_and_save(config, workdir)
    with np.load(again['npz']) as f:
        np.testing.assert_array_equal(f['labels'], np.full(6, 7, np.int32))

    config.sample.classifier_scale = 1.0
    with pytest.raises(ValueError, match='sample.classifier_workdir'):
        sampling.sample_and_save(config, workdir)
    config.sample.classifier_workdir = str(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match='sample.classifier_workdir'):
        sampling.sample_and_save(config, workdir)

    with np.load(again['npz']) as f:
        unguided = f['images']  # The next call writes the same file (same step).

    # Classifier guidance from a classifier trained by the same trainer.
    classifier_config = _classifier_config(config, num_classes=10)
    classifier_config.train.num_grid_samples = 0
    classifier_config.optim.learning_rate = 0.05  # Two big steps: a non-zero gradient.
    classifier_workdir = str(tmp_path / 'classifier')
    train.train_and_evaluate(classifier_config, classifier_workdir)
    config.sample.classifier_workdir = classifier_workdir
    config.sample.classifier_scale = 100.0
    guided = sampling.sample_and_save(config, workdir)
    with np.load(guided['npz']) as f:
        np.testing.assert_array_equal(f['labels'], np.full(6, 7, np.int32))
        assert f['images'].shape == (6, 8, 8, 1)
        assert np.abs(f['images'].astype(int) - unguided.astype(int)).max() > 0


def test_dpm_solver_respaced(small_config):
    small_config.sample.sampler = 'dpm_solver'
    small_config.sample.respacing = 'ddim5'
    model, params = _model_and_params(small_config)
    sample_fn = sampling.make_sample_fn(small_config, model)
    labels = np.zeros(BATCH, np.int32)
    out = np.asarray(sample_fn(params, jax.random.key(0), labels))
    assert out.shape == (BATCH, 8, 8, 1) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1.0) and out.std() > 0.05
    np.testing.assert_array_equal(np.asarray(sample_fn(params, jax.random.key(0), labels)),
                                  out)
