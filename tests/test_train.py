"""Tests for ddpm_jax.train: end to end, exact resume, sharding, accumulation, failures.

Tests that share the reference config share one `Trainer` (`_trainer`), so they pay
for compilation once per process. Most use `small_config` (a one-level UNet without
attention, half the compile time): what they test is the wiring, not the network.
"""

import json
import os
import re
import signal

import chex
import jax
import numpy as np
import optax
import pytest

from ddpm_jax import checkpointing, config_lib, parallel, state as state_lib, tasks, train
from ddpm_jax import workdir as workdir_lib
from ddpm_jax import data as data_lib


def _mesh(n):
    return parallel.create_mesh(jax.devices()[:n])


def _quiet(config):
    """The config of the shared reference run (compiled once for all tests using it)."""
    config.diffusion.timestep_sampling = 'loss_aware'  # Its state must resume exactly too.
    config.train.num_grid_samples = 0  # Only the end-to-end test writes sample grids.
    return config


_TRAINERS = {}


def _trainer(config, num_devices=1):
    """One `Trainer` per (config, device count) for the whole test process."""
    key = (config.to_json(), num_devices)
    if key not in _TRAINERS:
        _TRAINERS[key] = train.Trainer(config, mesh=_mesh(num_devices))
    return _TRAINERS[key]


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
    monkeypatch.setattr(data_lib, 'create_train_iterator',
                        lambda config: _Iterator(real(config), hook))


_REFERENCE = {}


def _reference_run(config, tmp_path_factory):
    """An uninterrupted 4-step run on 1 device (computed once per process)."""
    if 'state' not in _REFERENCE:
        workdir = tmp_path_factory.mktemp('reference')
        _REFERENCE['state'] = _host(_trainer(config).train(str(workdir)))
        _REFERENCE['workdir'] = workdir
    return _REFERENCE['state'], _REFERENCE['workdir']


def _data_position(workdir, step):
    path = checkpointing.checkpoint_dir(str(workdir)) / str(step) / 'data'
    return [p.read_text() for p in sorted(path.glob('process_*.json'))]


def test_train_end_to_end(small_config, tmp_path, capsys):
    config = _quiet(small_config)
    config.train.num_grid_samples = 4  # Not part of the step: the compile is shared.
    config.sample.respacing = '5'
    state = train.run_training(config, str(tmp_path), mesh=_mesh(1))
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


def test_resume_is_bit_for_bit(small_config, tmp_path, tmp_path_factory):
    config = _quiet(small_config)
    reference, reference_dir = _reference_run(config.copy_and_resolve_references(),
                                              tmp_path_factory)
    _trainer(config).train(str(tmp_path), stop_at_step=2)
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2']
    # A new Trainer, as a restarted process would build.
    resumed = train.Trainer(config, mesh=_mesh(1)).train(str(tmp_path))
    _assert_trees_equal(resumed, reference)  # step, params, EMA, opt state, task state
    assert int(reference.task_state.counts.sum()) == 4 * config.train.global_batch_size
    assert _data_position(tmp_path, 4) == _data_position(reference_dir, 4)


def test_preemption_saves_and_resumes(small_config, tmp_path, tmp_path_factory, monkeypatch):
    config = _quiet(small_config)
    reference, _ = _reference_run(config.copy_and_resolve_references(), tmp_path_factory)

    def sigterm_at_third_batch(k, batch):
        if k == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    with monkeypatch.context() as patch:
        _patch_iterator(patch, sigterm_at_third_batch)
        stopped = _trainer(config).train(str(tmp_path))
    assert int(stopped.step) == 3  # Step 3 is not a periodic save: saved for SIGTERM.
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handler restored.
    resumed = _trainer(config).train(str(tmp_path))
    _assert_trees_equal(resumed, reference)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(small_config, tmp_path,
                                                              monkeypatch):
    config = _quiet(small_config)

    def nan_at_third_batch(k, batch):
        if k == 3:
            batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        return batch

    _patch_iterator(monkeypatch, nan_at_third_batch)
    with pytest.raises(train.NonFiniteLossError, match='Non-finite loss .* at step 3.*step 2'):
        _trainer(config).train(str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2]
    step, params, ema = checkpointing.restore_for_inference(config, str(tmp_path), _mesh(1))
    assert step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host((params, ema))))


def _initial_state(config):
    """A fresh train state on the host (compiled once, not once per mesh)."""
    task = tasks.create_task(config)
    return _host(jax.jit(lambda rng: state_lib.create_train_state(task, rng))(
        jax.random.key(0)))


def _run_steps(config, mesh, initial, batch, num_steps=1):
    """Steps `initial` on `mesh` with one batch; the step may be traced only once.

    Returns:
        (final state, last metrics), on the host.
    """
    state = jax.device_put(initial, parallel.replicated_sharding(mesh))
    chex.clear_trace_counter()  # Chex counts per function body, across meshes.
    traced = chex.assert_max_traces(train.make_train_step_fn(tasks.create_task(config), mesh),
                                    n=1)
    step_fn = train.jit_train_step(traced, mesh)
    for _ in range(num_steps):
        state, metrics = step_fn(state, parallel.to_global(batch, mesh), jax.random.key(1))
    return _host(state), _host(metrics)


def test_sharded_step_matches_single_device(small_config):
    """Two steps (compiled once) on 4 devices equal those on 1, for the loss-aware
    sampler, classifier-free-guidance label dropout and two EMA decays."""
    config = small_config
    config.diffusion.timestep_sampling = 'loss_aware'  # Its update must see all devices.
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
    assert int(state4.task_state.counts.sum()) == 2 * config.train.global_batch_size


def test_grad_accumulation_matches_big_batch(small_config):
    """Two micro-batches on 2 devices equal one big batch on 1 device."""
    config = small_config
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
    assert big.task_state.shape == ()  # Uniform timesteps: a scalar placeholder.


def test_grad_clip_groups_clip_each_group_then_average(small_config):
    """optim.grad_clip_groups: DDPM's per-replica clipping (each TPU replica's gradient
    clipped to the norm, then the clipped ones averaged), checked through Adam's first
    moment after one step, mu = (1 - b1) g, against the groups' gradients by hand; with
    one group per micro-batch the same. (The one-level UNet: three steps compile.)"""
    config = small_config
    config.model.dropout = 0.0  # The loss's rng then plays no part.
    config.optim.eps = 1.0  # Keeps the update linear in the gradient for a fair compare.
    config.optim.grad_clip_norm = 1e-3  # Below every group's norm: all are clipped.
    config.optim.grad_clip_groups = 4
    initial = _initial_state(config)
    batch = next(data_lib.create_train_iterator(config))
    grouped, metrics = _run_steps(config, _mesh(2), initial, batch)

    task = tasks.create_task(config)
    prepare_rng, loss_rng = jax.random.split(jax.random.fold_in(jax.random.key(1), 0))
    examples = task.prepare_batch(batch, prepare_rng, initial.task_state)
    group_grad = jax.jit(lambda part: jax.grad(
        lambda p: task.loss(0, p, part, loss_rng)[0])(dict(initial.params))['model'])
    clipped = []
    for g in range(4):  # Group g: examples g, g + 4 (as the step splits the batch).
        grad = group_grad(jax.tree.map(lambda x, g=g: x[g::4], examples))
        norm = float(optax.global_norm(grad))
        assert norm > 10 * config.optim.grad_clip_norm
        clipped.append(jax.tree.map(lambda x, norm=norm: x * (1e-3 / norm), grad))
    expected = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / 4,
                            *clipped)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(grouped.opt_state)
          if 'mu' in jax.tree_util.keystr(path)]
    want = [(1 - config.optim.b1) * x for x in jax.tree.leaves(expected)]
    assert len(mu) == len(want)
    for got, w in zip(mu, want):
        np.testing.assert_allclose(got, w, rtol=2e-4, atol=1e-12)
    np.testing.assert_allclose(metrics['grad_norm'], float(optax.global_norm(expected)),
                               rtol=1e-4)
    # Four micro-batches of one group each, on 1 device: the same step.
    config.train.grad_accum_steps = 4
    accum, _ = _run_steps(config, _mesh(1), initial, batch)
    chex.assert_trees_all_close(accum, grouped, rtol=1e-5, atol=1e-9)
    # Groups that do not fit the batch or the micro-batches are refused by name.
    for groups, accum_steps, norm in ((3, 1, 1.0), (2, 4, 1.0), (4, 1, 0.0)):
        config.optim.grad_clip_groups, config.optim.grad_clip_norm = groups, norm
        config.train.grad_accum_steps = accum_steps
        with pytest.raises(ValueError, match=f'optim.grad_clip_groups={groups}'):
            config_lib.validate(config, mode='train', num_devices=1)


def test_classifier_training(small_config, tmp_path):
    """The classifier task: zero-initialised logits give loss log(10) and predict
    class 0 at the first step, so its accuracy is the batch's share of 0s."""
    config = small_config
    config.task = 'classifier'
    config.model.name = 'classifier'
    config.model.pool = 'adaptive'  # Its output layer starts at zero.
    config.model.num_classes = 10
    config.train.num_train_steps = 2
    config.train.num_grid_samples = 0
    batch = next(data_lib.create_train_iterator(config))
    state, metrics = _run_steps(config, _mesh(1), _initial_state(config), batch)
    np.testing.assert_allclose(metrics['loss'], np.log(10), rtol=1e-6)
    np.testing.assert_allclose(metrics['accuracy'], np.mean(batch['label'] == 0), atol=1e-7)
    _, metrics = _run_steps(config, _mesh(1), state, batch)
    assert metrics['loss'] < np.log(10)  # The step moved towards the labels.
    final = train.run_training(config, str(tmp_path), mesh=_mesh(1))
    assert int(final.step) == 2 and (tmp_path / 'checkpoints' / '2').is_dir()


def test_learning_rate_schedule(tiny_config):
    config = tiny_config
    config.optim.warmup_steps = 4
    config.optim.lr_schedule = 'cosine'
    config.train.num_train_steps = 12
    lr = state_lib.create_learning_rate_fn(config.optim, config.train.num_train_steps)
    peak = config.optim.learning_rate
    # DDPM's and score_sde's warmup: max_lr * min(step / warmup, 1), the first update at 0.
    np.testing.assert_allclose([lr(s) for s in range(4)], peak * np.arange(4) / 4,
                               rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lr(4), peak, rtol=1e-6)
    np.testing.assert_allclose(lr(8), peak * 0.5 * (1 + np.cos(np.pi * 4 / 8)), rtol=1e-5)
    np.testing.assert_allclose(lr(12), 0.0, atol=1e-12)


def test_summarize_metrics_groups():
    steps = [{'loss': 1.0, 'finite': 1.0, 'loss_q0_sum': 3.0, 'count_q0': 2.0,
              'r1_lazy_sum': 0.0, 'count_lazy': 0.0},
             {'loss': 3.0, 'finite': 1.0, 'loss_q0_sum': 1.0, 'count_q0': 2.0,
              'r1_lazy_sum': 0.5, 'count_lazy': 1.0}]
    assert train.summarize_metrics(steps) == {'loss': 2.0, 'loss_q0': 1.0, 'r1_lazy': 0.5}


def test_train_on_tfds_mock_data(small_config, tmp_path):
    """The trainer reads a TFDS dataset through tfds.data_source (mocked cifar10)."""
    import tensorflow_datasets as tfds
    small_config.data.dataset = 'cifar10'
    small_config.data.channels = 3
    small_config.train.num_train_steps = 2
    small_config.train.num_grid_samples = 0
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        state = train.run_training(small_config, str(tmp_path), mesh=_mesh(1))
    params = _host(state.params['model'])
    assert int(state.step) == 2
    assert params['conv_in']['kernel'].shape[-2] == 3  # RGB input from the TFDS source.
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert (tmp_path / 'checkpoints' / '2').is_dir()


def test_too_few_classes_for_the_dataset_is_refused_before_anything_runs(tiny_config,
                                                                         tmp_path):
    tiny_config.model.num_classes = 5  # The digits have 10.
    with pytest.raises(ValueError, match=r'model.num_classes=5 is smaller than the 10 classes '
                                         r"of data.dataset='digits'"):
        train.run_training(tiny_config, str(tmp_path), mesh=_mesh(1))
    assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'config.json').exists()
    assert not (tmp_path / workdir_lib.LOCK_NAME).exists()  # Released.


def _periodic_fid(config, **eval_fields):
    config.train.fid_every_steps = 100
    config.train.fid_num_samples = 100
    config.eval.metrics_network = 'digits'
    config.eval.fid_reference_num_images = 297
    config.eval.update(eval_fields)
    return config


@pytest.mark.parametrize('refuse, error, match', [
    (lambda c: c.model.update(num_classes=5), ValueError, r'^model.num_classes=5 is smaller'),
    (lambda c: c.data.update(dataset='nonexistent_ds'), FileNotFoundError,
     r"^data.dataset='nonexistent_ds' is neither a TFDS dataset name"),
    (lambda c: c.data.update(split='nonexistent_split'), ValueError,
     r"^data.split='nonexistent_split' is not a split of data.dataset='digits'"),
    (lambda c: _periodic_fid(c, fid_reference='/nonexistent_ref.npz'), FileNotFoundError,
     r"^eval.fid_reference='/nonexistent_ref.npz' does not exist"),
    (lambda c: _periodic_fid(c, fid_reference_split='nonexistent_split'), ValueError,
     r"^eval.fid_reference_split='nonexistent_split' is not a split"),
], ids=['num_classes', 'dataset', 'split', 'fid_reference', 'fid_reference_split'])
def test_refused_inputs_leave_no_workdir(tiny_config, tmp_path, refuse, error, match):
    """Checks that need no workdir run before it is created: a refused run leaves none."""
    refuse(tiny_config)
    workdir = tmp_path / 'new'
    with pytest.raises(error, match=match) as info:
        train.run_training(tiny_config, str(workdir), mesh=_mesh(1))
    assert '\n' not in str(info.value)
    assert not os.path.exists(workdir)


def test_a_second_trainer_on_the_workdir_is_refused(small_config, tmp_path):
    with workdir_lib.TrainLock(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {os.getpid()}'):
            train.run_training(_quiet(small_config), str(tmp_path), mesh=_mesh(1))
    assert not (tmp_path / 'checkpoints').exists()


def test_failing_runs_do_not_rewrite_the_config_record(small_config, tmp_path, monkeypatch):
    config = _quiet(small_config)
    _trainer(config).train(str(tmp_path), stop_at_step=2)
    record = (tmp_path / 'config.json').read_text()
    assert json.loads(record)['optim']['learning_rate'] == config.optim.learning_rate
    wide = config.copy_and_resolve_references()
    wide.model.base_channels = 16  # Another model: refused before anything is written.
    with pytest.raises(checkpointing.CheckpointMismatchError):
        train.run_training(wide, str(tmp_path), mesh=_mesh(1))
    unknown = config.copy_and_resolve_references()
    unknown.data.dataset = 'no_such_dataset_xyz'
    with pytest.raises(FileNotFoundError, match='neither a TFDS dataset name'):
        train.run_training(unknown, str(tmp_path), mesh=_mesh(1))

    def nan_batches(k, batch):
        return dict(batch, image=np.full_like(batch['image'], np.nan))

    _patch_iterator(monkeypatch, nan_batches)
    hot = config.copy_and_resolve_references()
    hot.optim.learning_rate = 1e5
    with pytest.raises(train.NonFiniteLossError, match='last good checkpoint is step 2.*'
                                                       'Try a lower optim.learning_rate\\.'):
        train.run_training(hot, str(tmp_path), mesh=_mesh(1))
    assert (tmp_path / 'config.json').read_text() == record
    runs = [json.loads(line) for line in (tmp_path / workdir_lib.RUN_LOG).read_text()
            .splitlines()]
    assert [r['config']['optim']['learning_rate'] for r in runs] == [
        config.optim.learning_rate, 1e5]  # The refused runs never started.


_KILL_SCRIPT = '''
import json, sys
import numpy as np
import optax
sys.path.insert(0, {repo!r})
import jax
from ddpm_jax import config_lib, data as data_lib, parallel, train
config = config_lib.from_json_dict(json.load(open(sys.argv[1])))
if sys.argv[3] == 'slow':  # Slow steps, so the kill lands while a save is under way.
    import time
    real = data_lib.create_train_iterator
    class Slow:
        def __init__(self, it): self._it = it
        def __next__(self):
            time.sleep(0.05)
            return next(self._it)
        def __getattr__(self, name): return getattr(self._it, name)
    data_lib.create_train_iterator = lambda c: Slow(real(c))
state = parallel.to_host(train.run_training(config, sys.argv[2]))
np.savez(sys.argv[2] + '.npz', *jax.tree.leaves(state))
'''


@pytest.mark.slow
def test_kill_9_during_a_save_then_resume_is_bit_for_bit(tiny_config, tmp_path):
    """SIGKILL while a checkpoint is being written; the restart equals an uninterrupted
    run leaf for leaf (params, EMA, optimiser, task state and data position)."""
    import subprocess
    import sys
    import time
    config = _quiet(tiny_config)
    config.train.num_train_steps = 12
    config.train.checkpoint_every_steps = 1
    config.train.keep_checkpoints = 20
    config.train.log_every_steps = 100
    config_path = tmp_path / 'config.json'
    config_path.write_text(json.dumps(config_lib.to_json_dict(config)))
    script = tmp_path / 'run.py'
    script.write_text(_KILL_SCRIPT.format(repo=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               JAX_PLATFORMS='cpu')
    run = str(tmp_path / 'run')
    process = subprocess.Popen([sys.executable, str(script), str(config_path), run, 'slow'],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / 'run' / 'checkpoints'
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
        if any('tmp' in n for n in names) and any(n.isdigit() and int(n) >= 3 for n in names):
            break  # A save is in flight, with earlier steps finished.
        time.sleep(0.005)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.kill()
    process.wait()
    assert not (tmp_path / 'run.npz').exists()
    for name, args in (('run', [run, 'fast']), ('reference', [str(tmp_path / 'reference'),
                                                               'fast'])):
        done = subprocess.run([sys.executable, str(script), str(config_path)] + args, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / 'run.npz') as resumed, np.load(
            tmp_path / 'reference.npz') as reference:
        assert len(resumed.files) == len(reference.files) > 10
        for key in reference.files:
            np.testing.assert_array_equal(resumed[key], reference[key])
