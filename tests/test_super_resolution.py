"""Tests for the super-resolution task (ADM-U) and upsampler sampling
(ddpm_jax.tasks.super_resolution, ddpm_jax.upsampling): the area downsampling against
float64 NumPy and PIL, the config rules, the low-resolution input conditioning the
loss and the samples, exact resume, the grid, sampling from an .npz (and its
wrong-size error), the cascade writing both resolutions, and `--mode=eval` (the
bound given the image's own low-resolution version) and `--mode=fid` (the eval
split upsampled, with PSNR) of an upsampler."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs import default, imagenet64_256_upsampler, imagenet128_512_upsampler
from ddpm_jax import config_lib, evaluate, models, parallel, sample_mode, sample_quality, train
from ddpm_jax import upsampling
from ddpm_jax import data as data_lib
from ddpm_jax import images as images_lib
from ddpm_jax.models import layers
from ddpm_jax.tasks import diffusion as diffusion_task
from ddpm_jax.tasks import super_resolution as sr


def _tiny_config(image_size=16, low_res_size=8, task='super_resolution'):
    """A one-level width-8 UNet, T = 20, on the digits served at `image_size`."""
    config = default.get_config()
    config.task = task
    config.data.dataset = 'digits'
    config.data.image_size = image_size
    config.data.channels = 1
    config.data.random_flip = False
    m = config.model
    m.base_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
    m.attention_resolutions, m.num_groups = (), 4
    m.num_classes = 10
    m.low_res_size = low_res_size
    config.diffusion.num_timesteps = 20
    config.optim.warmup_steps = 0
    config.optim.ema_decays = (0.9,)
    t = config.train
    t.global_batch_size, t.num_train_steps = 8, 4
    t.log_every_steps, t.checkpoint_every_steps, t.num_grid_samples = 1, 2, 4
    config.sample.num_images = 6  # Two batches of 4, the last one padded.
    config.sample.global_batch_size = 4
    return config


def _mesh(n):
    return parallel.create_mesh(jax.devices()[:n])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """An upsampler trained 4 steps, and 2 + resume + 2 steps, on one device."""
    root = tmp_path_factory.mktemp('sr')
    config = _tiny_config()
    trainer = train.Trainer(config, mesh=_mesh(1))
    reference = trainer.train(str(root / 'ref'))
    trainer.train(str(root / 'run'), stop_at_step=2)
    resumed = trainer.train(str(root / 'run'))
    return dict(config=config, trainer=trainer, reference=reference, resumed=resumed,
                workdir=str(root / 'ref'), root=root)


@pytest.fixture(scope='module')
def random_task(trained):
    """The tiny upsampler task and its trained parameters plus noise: ADM
    zero-initialises the output convolution, so after 4 steps the output barely
    depends on the inputs yet (reuses the trainer: nothing more to compile)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype),
                          parallel.to_host(trained['reference'].params))
    return trained['trainer'].task, params


# --- the low-resolution input ------------------------------------------------------------


@pytest.mark.parametrize('factor', [2, 4])
def test_downsample_area_is_the_block_mean(factor):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 8, 8, 3))
    want = np.zeros((2, 8 // factor, 8 // factor, 3))
    for i in range(8 // factor):  # float64 closed form: the mean of each block.
        for j in range(8 // factor):
            want[:, i, j] = x[:, i * factor:(i + 1) * factor,
                              j * factor:(j + 1) * factor].mean(axis=(1, 2))
    got = np.asarray(sr.downsample_area(jnp.asarray(x, jnp.float32), 8 // factor))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # PIL's BOX reduce (an integer factor) is the same filter.
    box = np.asarray(PIL.Image.fromarray(x[0, :, :, 0].astype(np.float32)).resize(
        (8 // factor, 8 // factor), PIL.Image.Resampling.BOX))
    np.testing.assert_allclose(got[0, :, :, 0], box, rtol=0, atol=1e-6)
    assert got[0, 0, 0, 0] == pytest.approx(x[0, :factor, :factor, 0].mean(), abs=1e-6)
    with pytest.raises(ValueError, match='multiples'):
        sr.downsample_area(jnp.zeros((1, 8, 8, 1)), 3)


def test_config_rules():
    def error(**fields):
        config = _tiny_config()
        for name, value in fields.items():
            group, key = name.split('__')
            config[group][key] = value
        with pytest.raises(ValueError) as info:
            config_lib.validate(config, num_devices=1)
        return str(info.value)

    config_lib.validate(_tiny_config(), num_devices=1)  # The tiny config is valid.
    assert 'model.low_res_size > 0' in error(model__low_res_size=0)
    assert 'power of 2' in error(model__low_res_size=6)  # 16 / 6: not an integer.
    assert 'power of 2' in error(model__low_res_size=16)  # Factor 1.
    assert 'train.fid_every_steps' in error(train__fid_every_steps=10)
    both = error(sample__low_res_npz='a.npz', sample__base_workdir='/b')
    assert 'sample.low_res_npz' in both and 'sample.base_workdir' in both
    assert 'sample.base_classifier_scale' in error(sample__base_classifier_scale=-2.0)
    config = _tiny_config(task='diffusion')
    with pytest.raises(ValueError, match="task='super_resolution'"):
        config_lib.validate(config, num_devices=1)  # A plain denoiser takes no low_res.
    assert _tiny_config(image_size=32, low_res_size=8).model.low_res_size == 8
    config_lib.validate(_tiny_config(image_size=32, low_res_size=8), num_devices=1)


def test_prepare_batch_downsamples_and_the_loss_sees_low_res(random_task):
    task, params = random_task
    rng = np.random.default_rng(1)
    batch = {'image': jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 1)), jnp.float32),
             'label': jnp.arange(4, dtype=jnp.int32)}
    examples = task.prepare_batch(batch, jax.random.key(0), task.init_task_state())
    image = np.asarray(batch['image'], np.float64)
    want = image.reshape(4, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(examples['low_res']), want, atol=1e-6)
    loss_fn = jax.jit(lambda ex: task.loss(0, params, ex, jax.random.key(2))[0])
    loss = lambda ex: float(loss_fn(ex))
    other = dict(examples, low_res=-examples['low_res'])
    assert abs(loss(examples) - loss(other)) > 1e-4  # The UNet is fed low_res.


def test_low_res_conditions_the_samples(random_task):
    task, params = random_task
    sample_fn = diffusion_task.make_sample_fn(task.config, task.model, mesh=_mesh(4))
    labels = np.arange(4, dtype=np.int32)
    low = np.random.default_rng(2).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    rng = jax.random.key(3)
    params = params['model']
    a = parallel.gather(sample_fn(params, rng, labels, low_res=low))
    b = parallel.gather(sample_fn(params, rng, labels, low_res=low))
    c = parallel.gather(sample_fn(params, rng, labels, low_res=np.flip(low, axis=1)))
    assert a.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # Same noise, other low-res image: other sample.
    assert sample_fn.jitted._cache_size() == 1  # New inputs, no recompilation.
    with pytest.raises(ValueError, match='low_res.*required'):
        sample_fn(params, rng, labels)
    with pytest.raises(ValueError, match=r'low_res must have shape \(4, 8, 8, 1\)'):
        sample_fn(params, rng, labels, low_res=low[:, :4, :4])


# --- training -----------------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(trained):
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(trained['resumed']),
                 parallel.to_host(trained['reference']))
    state = parallel.to_host(trained['reference'])
    assert int(state.step) == 4 and bool(state.task_state['grid_filled'])
    # The grid keeps the first batch's images (digits: a white background is -1).
    grid_images = state.task_state['grid_images']  # 16 kept; the batch has 8.
    assert grid_images.shape == (16, 16, 16, 1) and grid_images[:8].std() > 0.1
    assert not grid_images[8:].any() and not state.task_state['grid_labels'][8:].any()
    assert set(np.unique(state.task_state['grid_labels'])) <= set(range(10))


def test_grid_rows_are_inputs_samples_and_originals(trained):
    task, state = trained['trainer'].task, trained['reference']
    assert (trained['root'] / 'ref' / 'samples' / 'step_4.png').exists()  # The trainer's.
    grid_fn = task.make_grid_fn(_mesh(1), jax.random.key(0))
    images, columns = grid_fn({'model': state.ema_params[0]['model']}, state.task_state)
    assert columns == 4 and images.shape == (12, 16, 16, 1)
    originals = np.asarray(parallel.to_host(state.task_state['grid_images']))[:4]
    np.testing.assert_array_equal(images[8:], originals)
    low = originals.astype(np.float64).reshape(4, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(images[:4], np.repeat(np.repeat(low, 2, 1), 2, 2), atol=1e-6)
    assert np.abs(images[4:8]).max() <= 1.0 and images[4:8].std() > 0


# --- sampling ------------------------------------------------------------------------------


def _write_npz(path, images, labels=None):
    arrays = {'arr_0': images} if labels is None else {'images': images, 'labels': labels}
    images_lib.save_npz(path, **arrays)
    return str(path)


def test_upsampling_an_npz(trained, tmp_path):
    config = trained['config'].copy_and_resolve_references()
    rng = np.random.default_rng(4)
    low = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.int32)
    config.sample.low_res_npz = _write_npz(tmp_path / 'low.npz', low, labels)
    result = upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    with np.load(result['npz']) as f:
        assert f['images'].shape == (5, 16, 16, 1) and f['images'].dtype == np.uint8
        np.testing.assert_array_equal(f['labels'], labels)  # Carried to the output.
        assert f['images'].std() > 0
    assert result['num_images'] == 5 and result['png'].endswith('samples_4.png')
    assert (trained['root'] / 'ref' / 'samples' / 'samples_4.png').exists()


def test_wrong_size_npz_stops_before_compiling(trained, tmp_path, monkeypatch):
    config = trained['config'].copy_and_resolve_references()
    config.sample.low_res_npz = _write_npz(tmp_path / 'small.npz',
                                           np.zeros((4, 4, 4, 1), np.uint8),
                                           np.zeros((4,), np.int32))

    def no_compile(*args, **kwargs):
        raise AssertionError('make_sample_fn called before the input check')

    monkeypatch.setattr(diffusion_task, 'make_sample_fn', no_compile)
    with pytest.raises(ValueError) as info:
        upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    message = str(info.value)
    assert 'sample.low_res_npz=' in message and '4x4x1 images' in message
    assert 'takes 8x8x1' in message and 'model.low_res_size=8' in message
    config.sample.low_res_npz = _write_npz(tmp_path / 'nolabels.npz',
                                           np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match='has no labels.*class-conditional'):
        upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    config.sample.low_res_npz = ''
    with pytest.raises(ValueError, match='sample.low_res_npz.*sample.base_workdir'):
        upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    with pytest.raises(ValueError, match='upsampling.upsample_and_save'):
        sample_mode.sample_and_save(config, trained['workdir'], mesh=_mesh(4))


@pytest.mark.slow
def test_cascade_writes_both_resolutions_and_equals_two_stages(trained):
    """Base (8x8 digits, class-conditional) -> upsampler, in one call; the same images
    as --mode=sample on the base followed by upsampling its .npz."""
    base_config = _tiny_config(image_size=8, low_res_size=0, task='diffusion')
    base_config.train.num_train_steps = 1
    base_config.train.num_grid_samples = 0
    base_dir = str(trained['root'] / 'base')
    train.Trainer(base_config, mesh=_mesh(1)).train(base_dir)

    config = trained['config'].copy_and_resolve_references()
    config.sample.base_workdir = base_dir
    config.sample.base_respacing = '10'  # An override of the base's own settings.
    result = upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    with np.load(result['base_npz']) as f:
        base_images, base_labels = f['images'], f['labels']
    with np.load(result['npz']) as f:
        high, labels = f['images'], f['labels']
    assert base_images.shape == (6, 8, 8, 1) and high.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(labels, base_labels)
    assert base_labels.min() >= 0 and len(set(base_labels.tolist())) > 1
    assert result['npz'].endswith('cascade_4_16.npz')
    assert result['base_png'].endswith('cascade_4_8.png') and result['base_step'] == 1

    # Two stages: the base's own --mode=sample (same seed and settings), then the .npz.
    base_config.sample.num_images, base_config.sample.global_batch_size = 6, 4
    base_config.sample.respacing = '10'
    two = sample_mode.sample_and_save(base_config, base_dir, mesh=_mesh(4))
    with np.load(two['npz']) as f:
        np.testing.assert_array_equal(f['images'], base_images)
    config.sample.base_workdir = ''
    config.sample.low_res_npz = two['npz']
    upsampled = upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    with np.load(upsampled['npz']) as f:
        np.testing.assert_array_equal(f['images'], high)

    # --mode=fid of the cascade: the images of --mode=sample with the fid count and batch.
    fid_config = _fid_config(trained, num_samples=72)
    fid_config.sample.base_workdir, fid_config.sample.base_respacing = base_dir, '10'
    fid_config.sample.respacing = ''
    scored = upsampling.evaluate_upsampler(fid_config, trained['workdir'], mesh=_mesh(4))
    assert scored['num_samples'] == 72 and 'cascade' in scored['samples']
    assert 'psnr' not in scored and 0 <= scored['label_accuracy'] <= 1
    config.sample.low_res_npz, config.sample.base_workdir = '', base_dir
    config.sample.num_images, config.sample.global_batch_size = 72, 32
    cascade = upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))
    fid_config.eval.fid_samples = cascade['npz']
    given = upsampling.evaluate_upsampler(fid_config, trained['workdir'], mesh=_mesh(4))
    for key in ('fid', 'precision', 'recall', 'label_accuracy', 'inception_score'):
        assert given[key] == pytest.approx(scored[key], rel=1e-6, abs=1e-9), key

    # A base of the wrong size is named before anything compiles.
    config.sample.low_res_npz = ''
    config.sample.base_workdir = trained['workdir']  # A 16x16 upsampler, not a base.
    with pytest.raises(ValueError, match='sample.base_workdir=.*task=\'super_resolution\''):
        upsampling.upsample_and_save(config, trained['workdir'], mesh=_mesh(4))


# --- eval and fid -------------------------------------------------------------------------


def _eval_config(trained, num_images=4):
    config = trained['config'].copy_and_resolve_references()
    config.eval.num_images, config.eval.global_batch_size = num_images, 4
    return config


def test_eval_bits_per_dim_is_conditioned_on_the_low_res_image(trained, monkeypatch):
    config = _eval_config(trained)
    result = evaluate.evaluate(config, trained['workdir'], mesh=_mesh(4))
    assert result['num_images'] == 4 and np.isfinite(result['total_bpd'])
    assert 0.0 < result['total_bpd'] < 20.0
    parts = result['prior_bpd'] + sum(result[f'vb_q{q}'] for q in range(4))
    assert parts == pytest.approx(result['total_bpd'], rel=1e-5)

    # The conditioning is what training makes: the 2x2 means of the image itself.
    image = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (16, 16, 1)), jnp.float32)
    kwargs = evaluate.model_kwargs(config, image, jnp.int32(3))
    want = np.asarray(image, np.float64).reshape(8, 2, 8, 2, 1).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(kwargs['low_res'][0]), want, atol=1e-6)
    assert kwargs['y'].tolist() == [3]

    # Without the conditioning (zeroed low-res inputs) the same images score otherwise.
    def zeroed(config, images):
        return {'low_res': jnp.zeros_like(sr.downsample_area(images,
                                                             config.model.low_res_size))}

    monkeypatch.setattr(sr, 'conditioning', zeroed)
    unconditioned = evaluate.evaluate(config, trained['workdir'], mesh=_mesh(4))
    assert abs(unconditioned['total_bpd'] - result['total_bpd']) > 1e-3


def test_eval_ode_likelihood_is_conditioned_too(trained, monkeypatch):
    """eval.likelihood='ode' (the VP view's probability-flow ODE) takes the same
    conditioning: finite bits/dim, other ones without it."""
    config = _eval_config(trained, num_images=2)
    config.eval.global_batch_size = 2
    config.eval.likelihood, config.eval.ode_rtol, config.eval.ode_atol = 'ode', 1e-3, 1e-3
    result = evaluate.evaluate(config, trained['workdir'], mesh=_mesh(2))
    assert result['likelihood'] == 'ode' and result['num_images'] == 2
    assert np.isfinite(result['total_bpd']) and result['total_bpd'] > 0 and result['nfe'] > 10
    monkeypatch.setattr(sr, 'conditioning', lambda config, images: {
        'low_res': jnp.zeros_like(sr.downsample_area(images, config.model.low_res_size))})
    unconditioned = evaluate.evaluate(config, trained['workdir'], mesh=_mesh(2))
    assert abs(unconditioned['total_bpd'] - result['total_bpd']) > 1e-3


def _fid_config(trained, num_samples=72):
    config = trained['config'].copy_and_resolve_references()
    e = config.eval
    e.metrics_network = 'digits'
    e.fid_batch_size = 32  # Three batches, the last one padded.
    e.fid_num_samples = num_samples
    e.fid_reference_split, e.fid_reference_num_images = 'test', 297
    config.sample.respacing = '5'
    return config


def test_fid_upsamples_the_eval_split_and_reports_psnr(trained, tmp_path):
    config = _fid_config(trained)
    result = sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(4))
    assert result['num_samples'] == 72 and result['step'] == 4
    assert np.isfinite(result['fid']) and result['fid'] > 0
    assert 0 < result['label_accuracy'] <= 1  # Against the eval images' own labels.
    # A 4-step model samples near-noise (~5 dB); bilinear of the same inputs is ~22 dB.
    assert 2 < result['psnr'] < 10 and 18 < result['psnr_bilinear'] < 30
    assert 'upsampled' in result['samples']
    written = json.loads(open(result['json']).read())
    assert written['psnr'] == result['psnr'] and written['fid'] == result['fid']

    # PSNR and bilinear PSNR against float64 NumPy, on the same images and inputs.
    images, labels = data_lib.load_digits(config.data.eval_split)
    config_eval = config.copy_and_resolve_references()
    config_eval.eval.num_images, config_eval.eval.global_batch_size = 72, 72
    originals = next(iter(data_lib.create_eval_iterator(config_eval)))['image']
    low = np.round((originals.astype(np.float64).reshape(72, 8, 2, 8, 2, 1)
                    .mean(axis=(2, 4)) + 1) * 127.5)
    bilinear = np.asarray(layers.upsample_bilinear(jnp.asarray(low / 127.5 - 1, jnp.float32),
                                                   16), np.float64)
    bilinear = np.clip(np.round((bilinear + 1) * 127.5), 0, 255)
    reference = np.round((originals.astype(np.float64) + 1) * 127.5)
    mse = np.mean((bilinear - reference) ** 2, axis=(1, 2, 3))
    # (float32 rounding of a few pixels exactly between two grey levels: 1e-3 dB.)
    assert result['psnr_bilinear'] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)),
                                                    abs=5e-3)

    # The same images and noise on another device count: the same samples.
    again = sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(2))
    assert again['psnr'] == pytest.approx(result['psnr'], abs=1e-4)
    assert again['fid'] == pytest.approx(result['fid'], rel=1e-4)

    # eval.fid_samples still scores a given .npz (no sampling, no PSNR).
    config.eval.fid_samples = _write_npz(tmp_path / 'up.npz',
                                         images_lib.to_uint8(originals), labels[:72])
    given = sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(4))
    assert given['num_samples'] == 72 and 'psnr' not in given and given['step'] == -1


def test_fid_errors_are_one_line_before_compiling(trained, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError('a sampler or feature network was built before the check')

    monkeypatch.setattr(diffusion_task, 'make_sample_fn', no_compile)
    monkeypatch.setattr(sample_quality, 'FeatureExtractor', no_compile)
    config = _fid_config(trained)
    config.sample.low_res_npz = 'low.npz'
    with pytest.raises(ValueError, match=r"^sample.low_res_npz='low.npz': --mode=fid") as info:
        sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(4))
    assert '\n' not in str(info.value)
    config.sample.low_res_npz, config.sample.base_workdir = '', '/base'
    with pytest.raises(ValueError, match='upsampling.evaluate_upsampler'):
        sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(4))
    with pytest.raises(FileNotFoundError, match="sample.base_workdir='/base' has no checkp"):
        upsampling.evaluate_upsampler(config, trained['workdir'], mesh=_mesh(4))
    config = _fid_config(trained)
    config.eval.metrics_network = 'digit'
    with pytest.raises(ValueError, match='eval.metrics_network'):
        sample_quality.evaluate_samples(config, trained['workdir'], mesh=_mesh(4))
    config = _eval_config(trained)
    config.eval.likelihood = 'exact'
    monkeypatch.setattr(evaluate, 'make_eval_step_fn', no_compile)
    with pytest.raises(ValueError, match='eval.likelihood'):
        evaluate.evaluate(config, trained['workdir'], mesh=_mesh(4))


# --- configs -------------------------------------------------------------------------------


def _flatten(config, prefix=''):
    out = set()
    for key, value in config.items():
        out |= (_flatten(value, f'{prefix}{key}.') if hasattr(value, 'items')
                else {f'{prefix}{key}'})
    return out


UPSAMPLER_CONFIGS = {  # name: (low, high, batch, lr, steps), ADM Table 11 / the released flags.
    'imagenet64_256_upsampler': (64, 256, 256, 1e-4, 500_000),
    'imagenet128_512_upsampler': (128, 512, 256, 1e-4, 1_050_000),
    'digits_super_resolution': (8, 16, 64, 1e-3, 1_000),
}


@pytest.mark.parametrize('name', sorted(UPSAMPLER_CONFIGS))
def test_upsampler_configs(name):
    module = importlib.import_module(f'configs.{name}')
    assert module.__doc__.startswith(f'python main.py --config=configs/{name}.py --workdir=')
    config = module.get_config()
    assert set(_flatten(config)) == set(_flatten(default.get_config()))  # Overrides only.
    config_lib.validate(config, num_devices=1)
    config_lib.validate(config, mode='sample', num_devices=1)
    got = (config.model.low_res_size, config.data.image_size, config.train.global_batch_size,
           config.optim.learning_rate, config.train.num_train_steps)
    assert config.task == 'super_resolution' and got == UPSAMPLER_CONFIGS[name]


@pytest.mark.slow
def test_imagenet_upsampler_configs_are_the_released_networks():
    """Parameter counts of the released 64_256_upsampler.pt and 128_512_upsampler.pt
    (tests/test_released.py checks those files' tensors one by one)."""
    assert models.count_params(imagenet64_256_upsampler.get_config()) == 311_795_910
    assert models.count_params(imagenet128_512_upsampler.get_config()) == 308_835_270
