"""Shared test setup: four host CPU devices, float64 off, and a tiny config fixture."""

import os

# Must happen before JAX initialises its backends: sharded code is tested on 4 CPU devices.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
