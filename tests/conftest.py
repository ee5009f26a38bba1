"""Shared test setup: four host CPU devices, the tiny configs and config helpers."""

import os

# Must happen before JAX initialises its backends: sharded code is tested on 4 CPU devices.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The digits feature network is trained once and cached (atomically) for all workers.
os.environ.setdefault('DDPM_JAX_CACHE', os.path.join(os.environ.get('TMPDIR', '/tmp'),
                                                     'ddpm_jax_test_cache'))

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402


@pytest.fixture
def tiny_config():
    """A config small enough for a CPU test: 8x8 digits, width-8 UNet, T=20."""
    config = default.get_config()
    config.data.dataset = 'digits'
    config.data.image_size = 8
    config.data.channels = 1
    config.model.base_channels = 8
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (4,)
    config.model.num_groups = 4
    config.diffusion.num_timesteps = 20
    config.optim.warmup_steps = 0
    config.optim.ema_decays = (0.9,)
    config.train.global_batch_size = 8
    config.train.num_train_steps = 4
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.num_grid_samples = 4
    config.sample.num_images = 4
    config.sample.global_batch_size = 4
    config.eval.num_images = 8
    config.eval.global_batch_size = 4
    return config


@pytest.fixture
def small_config(tiny_config):
    """tiny_config with a one-level UNet without attention: quick to compile.

    The architecture is tested elsewhere; here only the wiring around it matters.
    """
    tiny_config.model.channel_mult = (1,)
    tiny_config.model.attention_resolutions = ()
    return tiny_config


def make_conditional(config, num_classes=3, class_dropout_prob=0.1):
    config.model.num_classes = num_classes
    config.model.class_dropout_prob = class_dropout_prob
    return config


def make_classifier_config(config, num_classes=3):
    config = ml_collections.ConfigDict(config.to_dict())  # A copy.
    config.task = 'classifier'
    config.model.name = 'classifier'
    config.model.num_classes = num_classes
    config.model.class_dropout_prob = 0.0
    config.model.pool = 'adaptive'
    return config
