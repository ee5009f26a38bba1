"""Shared test setup: four host CPU devices, the tiny configs and config helpers."""

import os

# Must happen before JAX initialises its backends: sharded code is tested on 4 CPU devices.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The digits feature network is trained once and cached (atomically) for all workers.
os.environ.setdefault('DDPM_JAX_CACHE', os.path.join(os.environ.get('TMPDIR', '/tmp'),
                                                     'ddpm_jax_test_cache'))

import contextlib  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402


def _lower_threefry_on_the_cpu(unrolled):
    """JAX lowers its threefry hash on a CPU as a rolled loop, inlined at every call,
    and LLVM takes ~0.1 s over each: initialising a tiny model (one call per parameter
    leaf) compiled in 10-14 s. The same rounds written out, as one out-of-line function
    (JAX's lowering for GPUs), compile in half that time and compute the same bits. The
    tests lower it so (unrolled), except under `threefry_lowered_as_jax_ships_it`;
    nothing changes if JAX's internals have moved."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry
    except ImportError:
        return
    # pylint: disable=protected-access
    rule = getattr(threefry, '_threefry2x32_lowering_rule' if unrolled
                   else '_threefry2x32_cpu_lowering_rule', None)
    if rule is not None and hasattr(threefry, 'threefry2x32_p'):
        mlir.register_lowering(threefry.threefry2x32_p, rule, platform='cpu',
                               inline=not unrolled)


@contextlib.contextmanager
def threefry_lowered_as_jax_ships_it():
    """For a test about the program JAX itself compiles for a CPU (a rolled loop)."""
    _lower_threefry_on_the_cpu(unrolled=False)
    jax.clear_caches()
    try:
        yield
    finally:
        _lower_threefry_on_the_cpu(unrolled=True)
        jax.clear_caches()


_lower_threefry_on_the_cpu(unrolled=True)


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
