"""Tests for ddpm_jax.checkpointing: policies, config refusal, partial steps, resharding.

These save states built with `jax.eval_shape`-sized random arrays or a compiled init;
no train step is compiled here.
"""

import copy
import os

import chex
import jax
import numpy as np
import optax
import pytest

from ddpm_jax import checkpointing, config_lib, parallel, state as state_lib, tasks, train
from ddpm_jax import data as data_lib


def _mesh(n):
    return parallel.create_mesh(jax.devices()[:n])


def _random_state(config, mesh, seed=0):
    """A TrainState with random (non-init) values, replicated over `mesh`."""
    abstract = state_lib.create_abstract_train_state(tasks.create_task(config), mesh)
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)
    values = [rng.normal(size=x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
              else rng.integers(0, 100, size=x.shape).astype(x.dtype) for x in leaves]
    return jax.tree.unflatten(treedef, [jax.device_put(v, x.sharding)
                                        for v, x in zip(values, leaves)])


def _save(config, workdir, state, step, data_state=None):
    with checkpointing.create_checkpoint_manager(str(workdir), config) as manager:
        checkpointing.save_checkpoint(manager, step, state, config, data_state, force=True)
        manager.wait_until_finished()


def test_restore_onto_fewer_devices(tiny_config, tmp_path):
    config = tiny_config
    config.diffusion.timestep_sampling = 'loss_aware'
    saved = _random_state(config, _mesh(4))
    iterator = data_lib.create_train_iterator(config)
    next(iterator), next(iterator)
    _save(config, tmp_path, saved, 7, iterator.get_state())
    expected = parallel.to_host(saved)
    for n in (2, 1):
        mesh = _mesh(n)
        abstract = state_lib.create_abstract_train_state(tasks.create_task(config), mesh)
        with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
            step, state, data_state = checkpointing.restore_checkpoint(manager, abstract,
                                                                       config)
        assert step == 7
        chex.assert_trees_all_equal(parallel.to_host(state), expected)
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.mesh.devices.size == n and leaf.sharding.is_fully_replicated
        # The data position is restored too: the next batch is the third one.
        fresh = data_lib.create_train_iterator(config)
        fresh.set_state(data_state)
        reference = data_lib.create_train_iterator(config)
        next(reference), next(reference)
        np.testing.assert_array_equal(next(fresh)['image'], next(reference)['image'])


def test_mismatched_config_is_refused(tiny_config, tmp_path):
    config = tiny_config
    _save(config, tmp_path, _random_state(config, _mesh(1)), 2)
    other = config.copy_and_resolve_references()
    other.model.base_channels = 16
    other.diffusion.num_timesteps = 30
    other.optim.learning_rate = 1e-3  # Not structural: allowed to change on resume.
    other.model.dtype = 'bfloat16'  # Compute only: allowed.
    with pytest.raises(checkpointing.CheckpointMismatchError) as info:
        train.run_training(other, str(tmp_path), mesh=_mesh(1))
    message = str(info.value)
    assert 'model.base_channels: checkpoint=8, config=16' in message
    assert 'diffusion.num_timesteps: checkpoint=20, config=30' in message
    assert 'learning_rate' not in message and 'dtype' not in message
    # The compatible config passes the check.
    with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
        saved = manager.restore(2, args=checkpointing.ocp.args.Composite(
            config=checkpointing.ocp.args.JsonRestore()))['config']
    checkpointing.check_config_compatible(saved, config)


def test_mismatch_is_one_line_naming_every_field(tiny_config):
    saved = config_lib.to_json_dict(tiny_config)
    other = tiny_config.copy_and_resolve_references()
    other.model.base_channels = 16
    other.diffusion.num_timesteps = 30
    with pytest.raises(checkpointing.CheckpointMismatchError) as info:
        checkpointing.check_config_compatible(saved, other)
    assert str(info.value) == (
        'The config does not match the checkpoint; differing fields: '
        'diffusion.num_timesteps: checkpoint=20, config=30; '
        "model.base_channels: checkpoint=8, config=16. Use the checkpoint's config or a "
        'new --workdir.')


def test_the_sde_is_structural_for_score_models_only(tiny_config):
    saved = config_lib.to_json_dict(tiny_config)
    other = tiny_config.copy_and_resolve_references()
    other.sde.kind, other.sde.sampling_eps = 've', 1e-5
    checkpointing.check_config_compatible(saved, other)  # A DDPM does not read `sde`.
    tiny_config.task = other.task = 'score'
    saved = config_lib.to_json_dict(tiny_config)
    with pytest.raises(checkpointing.CheckpointMismatchError) as info:
        checkpointing.check_config_compatible(saved, other)
    message = str(info.value)
    assert "sde.kind: checkpoint='vp', config='ve'" in message
    assert 'sampling_eps' not in message  # How it is sampled may change.


def test_partial_checkpoint_is_ignored(tiny_config, tmp_path):
    config = tiny_config
    state = _random_state(config, _mesh(1))
    _save(config, tmp_path, state, 2)
    # What a crash during the save of step 4 leaves: orbax's unfinalised temp dir.
    partial = checkpointing.checkpoint_dir(str(tmp_path)) / '4.orbax-checkpoint-tmp-1234'
    (partial / 'state').mkdir(parents=True)
    (partial / 'state' / 'garbage').write_text('half-written')
    abstract = state_lib.create_abstract_train_state(tasks.create_task(config), _mesh(1))
    with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
        assert manager.all_steps() == [2]
        step, restored, _ = checkpointing.restore_checkpoint(manager, abstract, config)
    assert step == 2
    chex.assert_trees_all_equal(parallel.to_host(restored), parallel.to_host(state))


def test_preservation_policy(tiny_config, tmp_path):
    config = tiny_config
    config.train.checkpoint_every_steps = 2
    config.train.keep_checkpoints = 2
    config.train.keep_checkpoint_every_steps = 4
    state = _random_state(config, _mesh(1))
    with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
        saved = [step for step in range(1, 11)
                 if checkpointing.save_checkpoint(manager, step, state, config)]
        manager.wait_until_finished()
        assert saved == [2, 4, 6, 8, 10]
        assert manager.all_steps() == [4, 8, 10]  # Latest 2, plus every 4th.


def test_restore_for_inference_selects_ema(tiny_config, tmp_path):
    config = tiny_config
    config.optim.ema_decays = (0.9, 0.99)
    state = _random_state(config, _mesh(4))
    _save(config, tmp_path, state, 3)
    config.sample.ema_decay = 0.99
    step, params, ema = checkpointing.restore_for_inference(config, str(tmp_path), _mesh(2))
    assert step == 3
    chex.assert_trees_all_equal(parallel.to_host(params), parallel.to_host(state.params))
    chex.assert_trees_all_equal(parallel.to_host(ema), parallel.to_host(state.ema_params[1]))
    config.sample.ema_decay = 0.5
    with pytest.raises(ValueError, match='sample.ema_decay=0.5'):
        checkpointing.restore_for_inference(config, str(tmp_path), _mesh(1))
    loaded = checkpointing.load_config(str(tmp_path))
    assert loaded.optim.ema_decays == (0.9, 0.99)
    assert loaded.model.channel_mult == tuple(config.model.channel_mult)


def test_no_checkpoint_raises(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
        checkpointing.restore_for_inference(tiny_config, str(tmp_path), _mesh(1))


def test_relative_workdir_saves_and_restores(tiny_config, tmp_path, monkeypatch):
    # orbax rejects relative paths inside its async writer; the manager must not see one.
    monkeypatch.chdir(tmp_path)
    mesh = _mesh(1)
    saved = _random_state(tiny_config, mesh)
    _save(tiny_config, 'run', saved, 3)
    assert (tmp_path / 'run' / 'checkpoints' / '3').is_dir()
    abstract = state_lib.create_abstract_train_state(tasks.create_task(tiny_config), mesh)
    with checkpointing.create_checkpoint_manager('run', tiny_config) as manager:
        step, state, _ = checkpointing.restore_checkpoint(manager, abstract, tiny_config,
                                                          restore_data=False)
    assert step == 3
    chex.assert_trees_all_equal(parallel.to_host(state), parallel.to_host(saved))


def test_workdir_check_refuses_other_model_before_anything_is_written(tiny_config, tmp_path):
    checkpointing.check_workdir_compatible(tiny_config, str(tmp_path / 'new'))  # No run yet.
    _save(tiny_config, tmp_path, _random_state(tiny_config, _mesh(1)), 2)
    checkpointing.check_workdir_compatible(tiny_config, str(tmp_path))  # Same model: fine.
    other = copy.deepcopy(tiny_config)
    other.model.base_channels = 16
    with pytest.raises(checkpointing.CheckpointMismatchError, match='model.base_channels'):
        checkpointing.check_workdir_compatible(other, str(tmp_path))


def test_turning_on_gradient_clipping_keeps_the_optimizer_state_layout(tiny_config):
    # A run resumed with clipping switched on (say after a NaN) must restore its state.
    params = {'w': np.zeros(4, np.float32)}
    grads = {'w': np.full(4, 100.0, np.float32)}  # Global norm 200.
    structures, first_moments = [], []
    for clip in (0.0, 1.0):
        config = copy.deepcopy(tiny_config)
        config.optim.grad_clip_norm = clip
        tx = state_lib.create_optimizer(config.optim, config.train.num_train_steps).tx
        state = tx.init(params)
        _, state = tx.update(grads, state, params)
        structures.append(jax.tree.structure(state))
        first_moments.append(np.asarray(optax.tree_utils.tree_get(state, 'mu')['w']))
    assert structures[0] == structures[1]
    b1 = tiny_config.optim.b1
    np.testing.assert_allclose(first_moments[0], (1 - b1) * 100.0, rtol=1e-6)  # Unclipped.
    np.testing.assert_allclose(first_moments[1], (1 - b1) * 0.5, rtol=1e-5)  # Norm 200 -> 1.


def _truncate_array_file(step_dir):
    data_files = sorted((step_dir / 'state' / 'd').iterdir())
    with open(data_files[0], 'r+b') as f:
        f.truncate(os.path.getsize(data_files[0]) // 2)
    return f'state/d/{data_files[0].name}'


@pytest.mark.parametrize('damage', ['truncate_array', 'empty_state_metadata', 'empty_data',
                                    'empty_config', 'bad_json_meta', 'missing_state_metadata'])
def test_damaged_latest_step_is_set_aside_and_the_previous_one_used(tiny_config, tmp_path,
                                                                     damage, caplog):
    config = tiny_config
    older, newer = _random_state(config, _mesh(1), seed=1), _random_state(config, _mesh(1))
    _save(config, tmp_path, older, 2, {'next_index': 16})
    _save(config, tmp_path, newer, 4, {'next_index': 32})
    step_dir = checkpointing.checkpoint_dir(str(tmp_path)) / '4'
    if damage == 'truncate_array':
        expected_file = _truncate_array_file(step_dir)
    else:
        expected_file = {'empty_state_metadata': 'state/_METADATA',
                         'empty_data': 'data/process_0-of-1.json',
                         'empty_config': 'config/metadata', 'bad_json_meta': 'meta/metadata',
                         'missing_state_metadata': 'state/_METADATA'}[damage]
        if damage == 'missing_state_metadata':
            (step_dir / expected_file).unlink()
        else:
            (step_dir / expected_file).write_text('{"truncat' if 'json' in damage else '')
    abstract = state_lib.create_abstract_train_state(tasks.create_task(config), _mesh(1))
    with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
        step, state, data_state = checkpointing.restore_checkpoint(manager, abstract, config)
        assert manager.all_steps() == [2]
    assert step == 2 and data_state == {'next_index': 16}
    chex.assert_trees_all_equal(parallel.to_host(state), parallel.to_host(older))
    warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
    assert len(warnings) == 1 and 'step 4' in warnings[0] and expected_file in warnings[0]
    assert 'Event loop is closed' not in caplog.text
    set_aside = tmp_path / checkpointing.DAMAGED_SUBDIR / '4'
    assert set_aside.is_dir() and not step_dir.exists()  # Moved, never deleted.


def test_no_readable_step_is_one_clear_error(tiny_config, tmp_path):
    config = tiny_config
    _save(config, tmp_path, _random_state(config, _mesh(1)), 2)
    (checkpointing.checkpoint_dir(str(tmp_path)) / '2' / 'config' / 'metadata').write_text('')
    with pytest.raises(FileNotFoundError, match=r'No readable checkpoint .*steps \[2\]'):
        checkpointing.restore_for_inference(config, str(tmp_path), _mesh(1))
    assert (tmp_path / checkpointing.DAMAGED_SUBDIR / '2').is_dir()


def test_checkpoint_of_version_0_1_is_converted(tiny_config, tmp_path):
    """A 0.1 checkpoint: params at the top level, `sampler_state`, no `meta/` item."""
    config = tiny_config
    config.diffusion.timestep_sampling = 'loss_aware'
    state = _random_state(config, _mesh(1))
    old_layout = {'step': state.step, 'params': state.params['model'],
                  'ema_params': tuple(e['model'] for e in state.ema_params),
                  'opt_state': state.opt_state['model'], 'sampler_state': state.task_state}
    old_config = config_lib.to_json_dict(config)
    del old_config['task']
    old_config['diffusion']['timestep_sampler'] = old_config['diffusion'].pop(
        'timestep_sampling')
    with checkpointing.create_checkpoint_manager(str(tmp_path), config) as manager:
        manager.save(5, args=checkpointing.ocp.args.Composite(
            state=checkpointing.ocp.args.StandardSave(old_layout),
            config=checkpointing.ocp.args.JsonSave(old_config)), force=True)
        manager.wait_until_finished()
    step, params, ema = checkpointing.restore_for_inference(config, str(tmp_path), _mesh(1))
    assert step == 5
    chex.assert_trees_all_equal(parallel.to_host(params), parallel.to_host(state.params))
    chex.assert_trees_all_equal(parallel.to_host(ema), parallel.to_host(state.ema_params[0]))
    assert checkpointing.load_config(str(tmp_path)).task == 'diffusion'
