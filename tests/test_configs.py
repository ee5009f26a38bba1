"""Tests for the paper configs in configs/: schema, commands, hyperparameters, sizes.

Parameter counts use `jax.eval_shape` (nothing is allocated) and must equal the
published models exactly: DDPM CIFAR-10 (Ho et al. 2020, 35.7M) and the released
ADM checkpoints of Dhariwal & Nichol 2021 (guided-diffusion).
"""

import importlib

import jax
import numpy as np
import pytest

from configs import default
from ddpm_jax import checkpointing, config_lib, models, tasks

CONFIGS = ('cifar10', 'celebahq256', 'imagenet64', 'imagenet128', 'imagenet256',
           'imagenet512', 'lsun_bedroom256', 'imagenet64_classifier')

# Published parameter counts. celebahq256 (DDPM, "114M") and imagenet512 (ADM,
# "559M") are only published rounded; their exact values are pinned here so that a
# change to the architecture shows up, and checked against the rounded figure.
PARAMS = {
    'cifar10': 35_746_307,
    'imagenet64': 295_904_454,
    'imagenet128': 421_529_606,
    'imagenet256': 553_838_086,
    'lsun_bedroom256': 552_814_086,
    'imagenet64_classifier': 65_438_568,
    'celebahq256': 113_673_219,
    'imagenet512': 558_997_638,
}
ROUNDED_MILLIONS = {'celebahq256': 114, 'imagenet512': 559}

# Hyperparameters from Ho et al. 2020 (App. B) and Dhariwal & Nichol 2021 (Table 11 and
# the released guided-diffusion flags).
PAPER = {
    'cifar10': dict(
        dataset='cifar10', image_size=32, variant='ddpm', base_channels=128,
        channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.1, num_classes=0, learn_sigma=False, schedule='linear',
        var_type='fixed_large', loss_type='mse', learning_rate=2e-4, batch=128,
        steps=800_000, warmup=5000, clip=1.0),
    'celebahq256': dict(
        dataset='celeb_a_hq/256', image_size=256, variant='ddpm', base_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.0, num_classes=0, learn_sigma=False, schedule='linear',
        # diffusion_utils.GaussianDiffusion (not CIFAR-10's _2) samples with beta~_t.
        var_type='fixed_small', loss_type='mse', learning_rate=2e-5, batch=64,
        steps=500_000, warmup=5000, clip=1.0),
    'imagenet64': dict(
        dataset='imagenet_resized/64x64', image_size=64, variant='adm', base_channels=192,
        channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
        dropout=0.1, num_classes=1000, learn_sigma=True, schedule='cosine',
        var_type='learned_range', loss_type='rescaled_mse', learning_rate=3e-4,
        batch=2048, steps=540_000, warmup=0, clip=0.0),
    'imagenet128': dict(
        dataset='imagenet2012', image_size=128, variant='adm', base_channels=256,
        channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8),
        dropout=0.0, num_classes=1000, learn_sigma=True, schedule='linear',
        var_type='learned_range', loss_type='rescaled_mse', learning_rate=1e-4,
        batch=256, steps=4_360_000, warmup=0, clip=0.0),
    'imagenet256': dict(
        dataset='imagenet2012', image_size=256, variant='adm', base_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), dropout=0.0, num_classes=1000, learn_sigma=True,
        schedule='linear', var_type='learned_range', loss_type='rescaled_mse',
        learning_rate=1e-4, batch=256, steps=1_980_000, warmup=0, clip=0.0),
    'imagenet512': dict(
        dataset='imagenet2012', image_size=512, variant='adm', base_channels=256,
        channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), dropout=0.0, num_classes=1000, learn_sigma=True,
        schedule='linear', var_type='learned_range', loss_type='rescaled_mse',
        learning_rate=1e-4, batch=256, steps=1_940_000, warmup=0, clip=0.0),
    'lsun_bedroom256': dict(
        dataset='lsun/bedroom', image_size=256, variant='adm', base_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), dropout=0.1, num_classes=0, learn_sigma=True,
        schedule='linear', var_type='learned_range', loss_type='rescaled_mse',
        learning_rate=1e-4, batch=256, steps=500_000, warmup=0, clip=0.0),
    'imagenet64_classifier': dict(
        dataset='imagenet_resized/64x64', image_size=64, variant='adm', base_channels=128,
        channel_mult=(1, 2, 3, 4), num_res_blocks=4, attention_resolutions=(32, 16, 8),
        dropout=0.0, num_classes=1000, learn_sigma=False, schedule='cosine',
        var_type='fixed_large', loss_type='mse', learning_rate=3e-4, batch=256,
        steps=300_000, warmup=0, clip=0.0),
}


def load(name):
    return importlib.import_module(f'configs.{name}')


def _flatten(config, prefix=''):
    out = {}
    for key, value in config.items():
        if hasattr(value, 'items'):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


@pytest.mark.parametrize('name', CONFIGS)
def test_docstring_starts_with_command(name):
    doc = load(name).__doc__
    assert doc.startswith(f'python main.py --config=configs/{name}.py --workdir=/path\n')


@pytest.mark.parametrize('name', CONFIGS)
def test_same_schema_as_default(name):
    config = _flatten(load(name).get_config())
    reference = _flatten(default.get_config())
    assert set(config) == set(reference)
    for key, value in config.items():
        # Same types (an int where a float belongs would change e.g. lr schedules).
        assert isinstance(value, type(reference[key])) or (
            isinstance(value, (tuple, list)) and isinstance(reference[key], (tuple, list))
        ), key


@pytest.mark.parametrize('name', CONFIGS)
def test_paper_hyperparameters(name):
    config = load(name).get_config()
    want = PAPER[name]
    got = dict(
        dataset=config.data.dataset, image_size=config.data.image_size,
        variant=config.model.variant, base_channels=config.model.base_channels,
        channel_mult=tuple(config.model.channel_mult),
        num_res_blocks=config.model.num_res_blocks,
        attention_resolutions=tuple(config.model.attention_resolutions),
        dropout=config.model.dropout, num_classes=config.model.num_classes,
        learn_sigma=config.model.learn_sigma, schedule=config.diffusion.schedule,
        var_type=config.diffusion.var_type, loss_type=config.diffusion.loss_type,
        learning_rate=config.optim.learning_rate, batch=config.train.global_batch_size,
        steps=config.train.num_train_steps, warmup=config.optim.warmup_steps,
        clip=config.optim.grad_clip_norm)
    assert got == want
    assert config.diffusion.num_timesteps == 1000
    assert config.diffusion.mean_type == 'eps'
    assert tuple(config.optim.ema_decays) == (0.9999,)
    assert config.model.class_dropout_prob == 0.0
    # tf.train.AdamOptimizer's epsilon in DDPM's TensorFlow runs; PyTorch's in ADM's.
    assert config.optim.eps_before_bias_correction == (config.model.variant == 'ddpm')
    if config.model.variant == 'adm':
        assert config.model.resblock_updown and config.model.use_scale_shift_norm
    if name.startswith(('imagenet128', 'imagenet256', 'imagenet512', 'lsun')):
        assert config.data.center_crop


def test_head_settings():
    assert load('imagenet128').get_config().model.num_heads == 4
    assert load('imagenet128').get_config().model.num_head_channels == -1
    for name in ('imagenet64', 'imagenet256', 'imagenet512', 'lsun_bedroom256',
                 'imagenet64_classifier'):
        assert load(name).get_config().model.num_head_channels == 64, name
    classifier = load('imagenet64_classifier').get_config()
    assert classifier.model.name == 'classifier' and classifier.model.pool == 'attention'


@pytest.mark.parametrize('name', CONFIGS)
def test_parameter_count(name):
    config = load(name).get_config()
    n = models.count_params(config)
    assert n == PARAMS[name]
    if name in ROUNDED_MILLIONS:
        assert round(n / 1e6) == ROUNDED_MILLIONS[name]


def test_null_label_row_not_in_published_count():
    config = load('imagenet256').get_config()
    config.model.class_dropout_prob = 0.1
    extra = models.count_params(config) - PARAMS['imagenet256']
    assert extra == 4 * config.model.base_channels  # One more embedding row.
    # The unconditional LSUN network is the ImageNet-256 one minus the label table.
    assert PARAMS['imagenet256'] - PARAMS['lsun_bedroom256'] == 1000 * 4 * 256


DDGAN_PAPER = {  # DDGAN's released training commands (readme.md of
    # NVlabs/denoising-diffusion-gan) with train_ddgan.py's defaults (--n_mlp 3,
    # --ema_decay 0.9999, --t_emb_dim 256, --nz 100, eta_min 1e-5).
    'cifar10_ddgan': dict(T=4, lr_g=1.6e-4, lr_d=1.25e-4, r1=0.02, lazy=15, ema=0.9999,
                          nz=100, n_mlp=4, mult=(1, 2, 2, 2), width=128, t_emb=256,
                          batch=64 * 4),
    'celebahq256_ddgan': dict(T=2, lr_g=2e-4, lr_d=1e-4, r1=2.0, lazy=10, ema=0.9999,
                              nz=100, n_mlp=3, mult=(1, 1, 2, 2, 4, 4), width=64, t_emb=256,
                              batch=4 * 8),
}
# Steps of their runs: epochs 0..num_epoch, each process taking its 1/P share of the
# N training images in full batches (DistributedSampler, drop_last=True).
DDGAN_RUNS = {  # (num_epoch, N, processes P, per-process batch)
    'cifar10_ddgan': (1800, 50_000, 4, 64),
    'celebahq256_ddgan': (800, 27_000, 8, 4),  # Their CelebA-HQ LMDB train split.
}
# (generator, discriminator) parameters. The generator is our UNet (no published
# count to match); the discriminators are checked against DDGAN's own below.
DDGAN_PARAMS = {
    # G: DDGAN's NCSN++ generator (48.43M on CIFAR-10, as the paper's); D: their
    # Discriminator_small / _large.
    'cifar10_ddgan': (48_432_515, 12_741_633),
    'celebahq256_ddgan': (39_726_979, 27_737_217),
    'digits_ddgan': (810_049, 634_753),
}


def _reference_discriminator_params(nc, ngf, t_emb_dim, large):
    """Parameters of DDGAN's Discriminator_small / _large (score_sde/models/
    discriminator.py), layer by layer: TimestepEmbedding's two dense layers, the 1x1
    start conv, DownConvBlocks (3x3 conv1, 3x3 conv2, dense_t1, bias-free 1x1 skip),
    the final 3x3 conv over the stddev channel and the end linear."""
    def conv(i, o, k, bias=True):
        return i * o * k * k + (o if bias else 0)

    def dense(i, o):
        return i * o + o

    def block(i, o):
        return conv(i, o, 3) + conv(o, o, 3) + dense(t_emb_dim, o) + conv(i, o, 1, bias=False)

    widths = [2, 4, 8, 8, 8, 8, 8] if large else [2, 2, 4, 8, 8]
    widths = [ngf * w for w in widths]
    return (2 * dense(t_emb_dim, t_emb_dim) + conv(nc, 2 * ngf, 1)
            + sum(block(i, o) for i, o in zip(widths[:-1], widths[1:]))
            + conv(8 * ngf + 1, 8 * ngf, 3) + dense(8 * ngf, 1))


@pytest.mark.parametrize('name', sorted(DDGAN_PAPER))
def test_ddgan_configs(name):
    module = load(name)
    assert module.__doc__.startswith(f'python main.py --config=configs/{name}.py '
                                     '--workdir=/path\n')
    config = module.get_config()
    assert set(_flatten(config)) == set(_flatten(default.get_config()))
    config_lib.validate(config, num_devices=1)
    want = DDGAN_PAPER[name]
    got = dict(T=config.diffusion.num_timesteps, lr_g=config.gan.lr_generator,
               lr_d=config.gan.lr_discriminator, r1=config.gan.r1_gamma,
               lazy=config.gan.lazy_reg, ema=config.optim.ema_decays[0],
               nz=config.model.latent_dim, n_mlp=config.model.mapping_layers - 1,
               mult=tuple(config.model.channel_mult), width=config.model.base_channels,
               t_emb=config.gan.disc_temb_dim, batch=config.train.global_batch_size)
    assert got == want
    assert (config.gan.b1, config.gan.b2, config.diffusion.schedule) == (0.5, 0.9, 'vp')
    assert (config.model.mapping_activation, config.model.output_tanh) == ('silu', True)
    assert (config.optim.lr_schedule, config.optim.min_learning_rate) == ('cosine', 1e-5)
    num_epoch, images, processes, batch = DDGAN_RUNS[name]
    assert config.train.num_train_steps == (num_epoch + 1) * (images // processes // batch)


@pytest.mark.parametrize('name', sorted(DDGAN_PARAMS))
def test_ddgan_parameter_counts(name):
    """Pinned counts; each discriminator equals DDGAN's exactly (Discriminator_small with
    nc = 2 C, ngf = disc_base_channels / 2, or Discriminator_large; their blocks:
    gan.disc_blocks='ddgan')."""
    config = load(name).get_config()
    shapes = jax.eval_shape(tasks.create_task(config).init_params, jax.random.key(0))
    counts = tuple(sum(x.size for x in jax.tree.leaves(shapes[part]))
                   for part in ('generator', 'discriminator'))
    assert counts == DDGAN_PARAMS[name]
    g = config.gan
    if name == 'digits_ddgan':
        return  # Two blocks and a label projection: no DDGAN counterpart.
    large = g.disc_downsample_first
    reference = _reference_discriminator_params(2 * config.data.channels,
                                                g.disc_base_channels // 2,
                                                g.disc_temb_dim, large)
    assert counts[1] == reference


@pytest.mark.parametrize('name', ['ldm_celebahq256', 'ldm_imagenet256'])
def test_ldm_configs_train_on_ldms_betas(name):
    """LDM's 'linear' betas (a line from sqrt(0.0015) to sqrt(0.0195), squared); a run
    recorded before the endpoints existed (Ho et al.'s 'quadratic') is refused by name."""
    config = importlib.import_module(f'configs.{name}').get_config()
    ldm = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(np.asarray(tasks.config_schedule(config).betas), ldm,
                               rtol=1e-6)
    old = config_lib.to_json_dict(config)
    del old['diffusion']['beta_start'], old['diffusion']['beta_end']
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'diffusion.beta_end: checkpoint=0.0, config=0.0195'):
        checkpointing.check_config_compatible(old, config)
