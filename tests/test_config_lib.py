"""Tests for ddpm_jax.config_lib: every rule names its field; JSON round trip; salts."""

import importlib
import json
import os

import jax
import pytest

from configs import default
from ddpm_jax import config_json
from ddpm_jax import config_lib
from ddpm_jax import models
from ddpm_jax.models import digits_net, inception
from ddpm_jax import sampler_registry

README = open(__file__.replace('tests/test_config_lib.py', 'README.md')).read()


@pytest.mark.parametrize('field, value, match', [
    ('task', 'gan', r"task='gan' is not valid.*'diffusion', 'classifier'"),
    ('diffusion.schedule', 'cosin', r"diffusion.schedule='cosin'.*'cosine'"),
    ('diffusion.timestep_sampling', 'importance', r"diffusion.timestep_sampling='importance'"),
    ('optim.optimizer', 'sgd', r"optim.optimizer='sgd'.*'adam', 'adamw'"),
    ('train.global_batch_size', 6, r'train.global_batch_size=6 .*device count \(4\)'),
    ('train.grad_accum_steps', 3, r'train.global_batch_size=8 is not divisible by '
                                  r'train.grad_accum_steps=3'),
    ('diffusion.var_type', 'learned_range', r'model.learn_sigma=True'),
    ('model.class_dropout_prob', 0.1, r'model.class_dropout_prob > 0 needs model.num_classes'),
    ('model.name', 'classifier', r"task='diffusion' needs model.name in \('unet', 'ncsnpp'\)"),
    ('model.remat_policy', 'dots', r"model.remat_policy='dots'.*'full', 'save_convs'"),
    ('sample.sampler', 'euler', r"sample.sampler='euler'.*'ddpm', 'ddim', 'dpm_solver'"),
    ('sample.respacing', '25', r"sample.respacing='25'"),
    ('sample.guidance_scale', 2.0, r'sample.guidance_scale=2.0 .*label dropout'),
    ('sample.ema_decay', 0.5, r'sample.ema_decay=0.5 is not one of optim.ema_decays'),
    ('optim.ema_decays', (1.0,), r'optim.ema_decays=\(1.0,\)'),
    ('sample.quantize', 'floor', r"sample.quantize='floor'.*'round', 'truncate'"),
    ('diffusion.beta_end', 0.02, r'diffusion.beta_start=0.0, beta_end=0.02: need 0 <'),
    ('optim.b1', 1.5, r'optim.b1=1.5 must be in \[0, 1\)'),
    ('optim.b2', -1.0, r'optim.b2=-1.0 must be in \[0, 1\)'),
    ('optim.eps', 0.0, r'optim.eps=0.0 must be > 0'),
    ('optim.weight_decay', -1.0, r'optim.weight_decay=-1.0 must be >= 0'),
    ('model.timestep_scale', -1.0, r'model.timestep_scale=-1.0 must be > 0'),
])
def test_train_mode_checks_name_the_field(tiny_config, field, value, match):
    """Training checks what its end-of-run sample grid will use, too."""
    node = tiny_config
    *groups, name = field.split('.')
    for group in groups:
        node = node[group]
    node[name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config, mode='train', num_devices=4)


@pytest.mark.parametrize('mode, field, value, match', [
    ('sample', 'sample.global_batch_size', 6, r'sample.global_batch_size=6 .*device count'),
    ('sample', 'sample.num_images', 0, r'sample.num_images=0 must be >= 1'),
    ('sample', 'sample.label', 3, r'sample.label=3 needs a class-conditional model'),
    ('sample', 'sample.classifier_scale', 1.0, r'needs sample.classifier_workdir'),
    ('eval', 'eval.global_batch_size', 6, r'eval.global_batch_size=6 .*device count'),
    ('eval', 'eval.num_images', 0, r'eval.num_images=0 must be >= 1'),
])
def test_other_modes_check_their_groups(tiny_config, mode, field, value, match):
    group, name = field.split('.')
    config_lib.validate(tiny_config, mode=mode, num_devices=4)  # Valid as it is.
    tiny_config[group][name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config, mode=mode, num_devices=4)


def test_eval_mode_refuses_tasks_without_bits_per_dim():
    config = _config_file('digits_ddgan')
    config_lib.validate(config, mode='sample', num_devices=1)  # Valid for sampling.
    with pytest.raises(ValueError, match=r"--mode=eval .* task='ddgan' does not define"):
        config_lib.validate(config, mode='eval', num_devices=1)


def test_ddgan_checks_its_adam_betas():
    config = _config_file('digits_ddgan')
    config.gan.b1 = 2.0
    with pytest.raises(ValueError, match=r'gan.b1=2.0 and gan.b2=0.9 must be in \[0, 1\)'):
        config_lib.validate(config, mode='train', num_devices=1)


def _config_file(name):
    return importlib.import_module(f'configs.{name}').get_config()


def test_sample_mode_refuses_a_classifier_config(tiny_config):
    tiny_config.task = 'classifier'
    tiny_config.model.name = 'classifier'
    tiny_config.model.num_classes = 10
    config_lib.validate(tiny_config, mode='train', num_devices=4)
    with pytest.raises(ValueError, match=r"--mode=sample needs a model that generates"):
        config_lib.validate(tiny_config, mode='sample', num_devices=4)


def test_the_grid_is_not_checked_when_there_is_none(tiny_config):
    tiny_config.sample.respacing = '25'  # More steps than T=20: only the grid reads it.
    tiny_config.train.num_grid_samples = 0
    config_lib.validate(tiny_config, mode='train', num_devices=4)


def test_batch_rule_counts_processes():
    config_lib.check_global_batch('b', 8, num_devices=4, num_processes=2)
    with pytest.raises(ValueError, match=r'b=6 is not divisible by the process count \(4\)'):
        config_lib.check_global_batch('b', 6, num_devices=1, num_processes=4)
    with pytest.raises(ValueError, match=r'b=0 must be >= 1'):
        config_lib.check_global_batch('b', 0)


def test_json_round_trip_and_upgrade_of_old_records():
    config = default.get_config()
    restored = config_lib.from_json_dict(json.loads(json.dumps(config_lib.to_json_dict(config))))
    assert restored.to_dict() == config.to_dict()
    assert isinstance(restored.model.channel_mult, tuple)
    old = config_lib.to_json_dict(config)  # As ddpm_jax 0.1 wrote it:
    del old['task']
    old['diffusion']['timestep_sampler'] = old['diffusion'].pop('timestep_sampling')
    old['model']['name'] = 'classifier'
    upgraded = config_lib.upgrade_json_dict(old)
    assert upgraded['task'] == 'classifier'
    assert upgraded['diffusion']['timestep_sampling'] == 'uniform'
    assert 'timestep_sampler' not in upgraded['diffusion'] and 'task' not in old


def test_salts_are_distinct_and_streams_independent():
    assert len(set(config_lib.RNG_SALTS.values())) == len(config_lib.RNG_SALTS)
    config = default.get_config()
    keys = {name: jax.random.key_data(config_lib.rng_for(config, name)).tolist()
            for name in config_lib.RNG_SALTS}
    assert len({json.dumps(k) for k in keys.values()}) == len(keys)


def test_sampler_table_is_what_the_config_and_readme_document():
    """Adding a sampler is one function and one table entry; the docs must follow."""
    lines = open(default.__file__).read().splitlines()
    start = [i for i, line in enumerate(lines) if 'sample.sampler =' in line][0]
    end = start + 1
    while lines[end].strip().startswith('#'):  # The comment's continuation lines.
        end += 1
    comment = ' '.join(lines[start:end])
    for name in sampler_registry.SAMPLERS:
        assert f"'{name}'" in comment, name
        assert f'`{name}`' in README, name


def _leaf_keys(tree, prefix=''):
    keys = set()
    for key, value in tree.items():
        keys |= _leaf_keys(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key}
    return keys


def test_a_record_of_the_previous_schema_upgrades_and_fills():
    """The default config as the last landing (860764b) stored it: its model fields are
    upgraded (a model can be built from it), and `fill_missing` gives exactly today's
    fields, keeping the record's values."""
    path = os.path.join(os.path.dirname(__file__), 'data', 'default_config_860764b.json')
    with open(path) as f:
        old = json.load(f)
    current = config_lib.to_json_dict(default.get_config())
    upgraded = config_lib.upgrade_json_dict(old)
    assert set(upgraded['model']) == set(current['model'])
    models.create_model(config_lib.from_json_dict(upgraded))
    missing = _leaf_keys(current) - _leaf_keys(upgraded)
    assert 'sample.langevin_step_size' in missing  # Newer than the record ...
    schema = json.loads(json.dumps(current))
    schema['sample']['heun_sigma_max'] = 80.0
    schema['data']['image_size'] = 999
    filled = config_json.fill_missing(upgraded, schema)
    assert _leaf_keys(filled) == _leaf_keys(current)  # ... filled from the schema,
    assert filled['sample']['heun_sigma_max'] == 80.0
    assert filled['data']['image_size'] == old['data']['image_size']  # the record's kept.


def test_inception_input_is_checked_before_the_weights_file(tiny_config):
    tiny_config.eval.inception_input = 'torch'
    with pytest.raises(ValueError, match=r"eval.inception_input='torch'.*'pytorch_fid', 'tf'"):
        config_lib.validate(tiny_config, mode='fid', num_devices=1)


@pytest.mark.parametrize('network, dim', [('inception', 2048), ('digits', 64)])
def test_fid_needs_more_samples_than_feature_dimensions(tiny_config, tmp_path, network, dim):
    """FID's D x D covariances are singular from N <= D samples: refused up front,
    not after the sampling (the periodic score's default was once 1,000 < 2,048)."""
    assert config_lib.METRICS_FEATURE_DIMS == {'inception': inception.POOL3_DIM,
                                               'digits': digits_net.FEATURE_DIM}
    weights = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
    weights.write_bytes(b'')  # Only its existence is checked before the run.
    e = tiny_config.eval
    e.metrics_network, e.inception_path = network, str(weights)
    e.fid_num_samples, e.fid_reference_num_images = dim + 1, dim + 1
    config_lib.validate(tiny_config, mode='fid', num_devices=1)
    e.fid_num_samples = dim
    with pytest.raises(ValueError, match=rf'eval.fid_num_samples={dim} must be > {dim}: '
                                         rf'{network} features are {dim}-d'):
        config_lib.validate(tiny_config, mode='fid', num_devices=1)
    e.fid_num_samples, e.fid_reference_num_images = dim + 1, dim
    with pytest.raises(ValueError, match=rf'eval.fid_reference_num_images={dim} must be'):
        config_lib.validate(tiny_config, mode='fid', num_devices=1)
    e.fid_reference = str(tmp_path / 'ref.npz')  # Statistics from a file: not counted.
    config_lib.validate(tiny_config, mode='fid', num_devices=1)
    # Scoring during training, with the schema's default count.
    train = default.get_config().train
    tiny_config.train.fid_every_steps = 2
    tiny_config.train.fid_num_samples = train.fid_num_samples
    assert train.fid_num_samples > 2048
    config_lib.validate(tiny_config, mode='train', num_devices=1)
    tiny_config.train.fid_num_samples = dim
    with pytest.raises(ValueError, match=rf'train.fid_num_samples={dim} must be > {dim}'):
        config_lib.validate(tiny_config, mode='train', num_devices=1)


@pytest.mark.parametrize('field, value, match', [
    ('precision_recall_distances', 'float64', r"eval.precision_recall_distances='float64'"),
    ('precision_recall_reference_images', 3, r'eval.precision_recall_reference_images=3'),
])
def test_precision_recall_fields_are_checked(tiny_config, field, value, match):
    tiny_config.eval.metrics_network = 'digits'
    tiny_config.eval.fid_num_samples = tiny_config.eval.fid_reference_num_images = 100
    config_lib.validate(tiny_config, mode='fid', num_devices=1)
    tiny_config.eval[field] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config, mode='fid', num_devices=1)
