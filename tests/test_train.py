"""Tests for ddpm_jax.train: end to end, exact resume, sharding, accumulation, failures.

Compiled functions are cached per (config, mesh) inside a process, so tests that share
the tiny config and mesh pay for compilation once.
"""

import os
import re
import signal

import chex
import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, parallel, train
from ddpm_jax import data as data_lib
from ddpm_jax.models import create_model


def _mesh(n):
    return parallel.create_mesh(jax.devices()[:n])


def _quiet(config):
    """The config of the shared reference run (compiled once for all tests using it)."""
    config.diffusion.timestep_sampler = 'loss_aware'  # Its state must resume exactly too.
    config.train.num_grid_samples = 0  # Only the end-to-end test writes sample grids.
    return config


def _host(tree):
    return jax.tree.map(np.asarray, parallel.to_host(tree))


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(_host(a), _host(b))


class _Iterator:
    """Wraps the real data iterator; calls `hook(k)` before the k-th batch (1-based)."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.count = inner, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        batch = next(self.inner)
        return self.hook(self.count, batch)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def close(self):
        self.inner.close()


def _patch_iterator(monkeypatch, hook):
    real = data_lib.create_train_iterator
    monkeypatch.setattr(train.data_lib, 'create_train_iterator',
                        lambda config: _Iterator(real(config), hook))


_REFERENCE = {}


def _reference_run(config, tmp_path_factory):
    """An uninterrupted 4-step run on 1 device (computed once per process)."""
    if 'state' not in _REFERENCE:
        workdir = tmp_path_factory.mktemp('reference')
        _REFERENCE['state'] = _host(train.train_and_evaluate(config, str(workdir),
                                                             mesh=_mesh(1)))
        _REFERENCE['workdir'] = workdir
    return _REFERENCE['state'], _REFERENCE['workdir']


def _data_position(workdir, step):
    path = checkpointing.checkpoint_dir(str(workdir)) / str(step) / 'data'
    return [p.read_text() for p in sorted(path.glob('process_*.json'))]


def test_train_end_to_end(tiny_config, tmp_path, capsys):
    config = _quiet(tiny_config)
    config.train.num_grid_samples = 4  # Not part of the step: the compile is shared.
    config.sample.respacing = '5'
    state = train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r' loss=([^,\s]+)', out)]
    assert len(losses) == 4 and np.all(np.isfinite(losses)), out
    for name in ('grad_norm', 'learning_rate', 'loss_q0', 'mse', 'steps_per_sec',
                 'images_per_sec'):
        assert f'{name}=' in out
    assert int(state.step) == 4
    ema, params = _host(state.ema_params[0]), _host(state.params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), ema, params))
    assert max(diffs) > 0
    steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
    assert steps == [2, 4]
    assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
    assert list((tmp_path / 'samples').glob('*.png'))


def test_resume_is_bit_for_bit(tiny_config, tmp_path, tmp_path_factory):
    config = _quiet(tiny_config)
    reference, reference_dir = _reference_run(config.copy_and_resolve_references(),
                                              tmp_path_factory)
    first = config.copy_and_resolve_references()
    first.train.num_train_steps = 2
    train.train_and_evaluate(first, str(tmp_path), mesh=_mesh(1))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2']
    resumed = train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    _assert_trees_equal(resumed, reference)  # step, params, EMA, opt state, sampler
    assert int(reference.sampler_state.counts.sum()) > 0
    assert _data_position(tmp_path, 4) == _data_position(reference_dir, 4)
    # The restored state has the same types as a fresh one: no retrace on resume.
    _, step_fn = train._jitted_fns(config, _mesh(1))  # pylint: disable=protected-access
    assert step_fn._cache_size() == 1  # pylint: disable=protected-access


def test_preemption_saves_and_resumes(tiny_config, tmp_path, tmp_path_factory, monkeypatch):
    config = _quiet(tiny_config)
    reference, _ = _reference_run(config.copy_and_resolve_references(), tmp_path_factory)

    def sigterm_at_third_batch(k, batch):
        if k == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    with monkeypatch.context() as patch:
        _patch_iterator(patch, sigterm_at_third_batch)
        stopped = train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    assert int(stopped.step) == 3  # Step 3 is not a periodic save: saved for SIGTERM.
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handler restored.
    resumed = train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    _assert_trees_equal(resumed, reference)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path,
                                                              monkeypatch):
    config = _quiet(tiny_config)

    def nan_at_third_batch(k, batch):
        if k == 3:
            batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        return batch

    _patch_iterator(monkeypatch, nan_at_third_batch)
    with pytest.raises(train.NonFiniteLossError, match='Non-finite loss .* at step 3.*step 2'):
        train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2]
    step, params, ema = checkpointing.restore_for_inference(config, str(tmp_path), _mesh(1))
    assert step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host((params, ema))))


def _initial_state(config):
    """A fresh train state on the host (compiled once, not once per mesh)."""
    model = create_model(config)
    return _host(jax.jit(lambda rng: train.create_train_state(config, model, rng))(
        jax.random.key(0)))


def _run_steps(config, mesh, initial, batch, num_steps=1):
    """Steps `initial` on `mesh` with one batch; the step may be traced only once.

    Returns:
        (final state, last metrics), on the host.
    """
    model = create_model(config)
    state = jax.device_put(initial, parallel.replicated_sharding(mesh))
    chex.clear_trace_counter()  # Chex counts per function body, across meshes.
    traced = chex.assert_max_traces(train.make_train_step_fn(config, model, mesh), n=1)
    step_fn = train.jit_train_step(traced, mesh)
    for _ in range(num_steps):
        state, metrics = step_fn(state, parallel.to_global(batch, mesh), jax.random.key(1))
    assert step_fn._cache_size() == 1  # pylint: disable=protected-access
    return _host(state), _host(metrics)


def test_sharded_step_matches_single_device(tiny_config):
    """Two steps (compiled once) on 4 devices equal those on 1, for the loss-aware
    sampler, classifier-free-guidance label dropout and two EMA decays."""
    config = tiny_config
    config.diffusion.timestep_sampler = 'loss_aware'  # Its update must see all devices.
    config.model.num_classes = 10
    config.model.class_dropout_prob = 0.5
    config.optim.ema_decays = (0.9, 0.5)
    initial = _initial_state(config)
    batch = next(data_lib.create_train_iterator(config))
    state1, metrics1 = _run_steps(config, _mesh(1), initial, batch, num_steps=2)
    state4, metrics4 = _run_steps(config, _mesh(4), initial, batch, num_steps=2)
    assert int(state4.step) == 2
    chex.assert_trees_all_close(state4, state1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(metrics4, metrics1, rtol=1e-5, atol=1e-6)
    assert int(state4.sampler_state.counts.sum()) == 2 * config.train.global_batch_size


def test_grad_accumulation_matches_big_batch(tiny_config):
    """Two micro-batches on 2 devices equal one big batch on 1 device."""
    config = tiny_config
    config.optim.eps = 1.0  # Keeps the update linear in the gradient for a fair compare.
    initial = _initial_state(config)
    batch = next(data_lib.create_train_iterator(config))
    big, big_metrics = _run_steps(config, _mesh(1), initial, batch)
    config.train.grad_accum_steps = 2
    accum, accum_metrics = _run_steps(config, _mesh(2), initial, batch)
    chex.assert_trees_all_close(accum, big, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(accum_metrics, big_metrics, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), big.params, initial.params)
    assert max(jax.tree.leaves(moved)) > 1e-6  # The step did update the parameters.
    # EMA after one step from EMA_0 = p_0: d * p_0 + (1 - d) * p_1.
    decay = config.optim.ema_decays[0]
    expected = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, initial.params,
                            big.params)
    chex.assert_trees_all_close(big.ema_params[0], expected, rtol=1e-5, atol=1e-7)
    assert big.sampler_state.shape == ()  # Uniform sampler: a scalar placeholder.


def test_classifier_training(tiny_config, tmp_path, capsys):
    config = tiny_config
    config.model.name = 'classifier'
    config.model.num_classes = 10
    config.train.num_train_steps = 2
    state = train.train_and_evaluate(config, str(tmp_path), mesh=_mesh(1))
    out = capsys.readouterr().out
    assert int(state.step) == 2
    accuracy = [float(x) for x in re.findall(r' accuracy=([^,\s]+)', out)]
    losses = [float(x) for x in re.findall(r' loss=([^,\s]+)', out)]
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    assert np.all(np.isfinite(losses)) and losses[0] > 1.0  # ~log(10) at init.
    assert (tmp_path / 'checkpoints' / '2').is_dir()


def test_learning_rate_schedule(tiny_config):
    config = tiny_config
    config.optim.warmup_steps = 4
    config.optim.lr_schedule = 'cosine'
    config.train.num_train_steps = 12
    lr = train.create_learning_rate_fn(config)
    peak = config.optim.learning_rate
    np.testing.assert_allclose([lr(s) for s in range(4)], peak * np.arange(1, 5) / 4,
                               rtol=1e-6)
    np.testing.assert_allclose(lr(4), peak, rtol=1e-6)
    np.testing.assert_allclose(lr(8), peak * 0.5 * (1 + np.cos(np.pi * 4 / 8)), rtol=1e-5)
    np.testing.assert_allclose(lr(12), 0.0, atol=1e-12)


@pytest.mark.parametrize('field, value, match', [
    ('diffusion.schedule', 'cosin', r"diffusion.schedule='cosin'.*'cosine'"),
    ('optim.optimizer', 'sgd', r"optim.optimizer='sgd'.*'adam', 'adamw'"),
    ('train.global_batch_size', 6, r'train.global_batch_size=6 .*device count \(4\)'),
    ('train.grad_accum_steps', 3, r'train.global_batch_size=8 is not divisible by '
                                  r'train.grad_accum_steps=3'),
    ('diffusion.var_type', 'learned_range', r'model.learn_sigma=True'),
])
def test_validate_config_names_the_field(tiny_config, field, value, match):
    section, name = field.split('.')
    tiny_config[section][name] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(tiny_config, num_devices=4)


def test_summarize_metrics_quartiles():
    steps = [{'loss': 1.0, 'finite': 1.0, 'loss_q0_sum': 3.0, 'count_q0': 2.0},
             {'loss': 3.0, 'finite': 1.0, 'loss_q0_sum': 1.0, 'count_q0': 2.0}]
    assert train.summarize_metrics(steps) == {'loss': 2.0, 'loss_q0': 1.0}


def test_train_on_tfds_mock_data(tiny_config, tmp_path):
    """The trainer reads a TFDS dataset through tfds.data_source (mocked cifar10)."""
    import tensorflow_datasets as tfds
    tiny_config.data.dataset = 'cifar10'
    tiny_config.data.channels = 3
    tiny_config.train.num_train_steps = 2
    tiny_config.train.num_grid_samples = 0
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        state = train.train_and_evaluate(tiny_config, str(tmp_path), mesh=_mesh(1))
    params = _host(state.params)
    assert int(state.step) == 2
    assert params['conv_in']['kernel'].shape[-2] == 3  # RGB input from the TFDS source.
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert (tmp_path / 'checkpoints' / '2').is_dir()
