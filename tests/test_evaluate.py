"""Tests for ddpm_jax.evaluate (bits/dim on the test split)."""

import json

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing
from ddpm_jax import evaluate
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import tasks


def _write_checkpoint(config, workdir, step=3):
    """Saves a train state with random host-drawn values (no XLA-compiled init).

    Float leaves ~ 0.1 N(0, 1) (the UNet then predicts some non-zero eps), integer
    leaves 0; the state's structure comes from `state.create_abstract_train_state`.
    """
    mesh = parallel.create_mesh()
    abstract = state_lib.create_abstract_train_state(tasks.create_task(config), mesh)
    rng = np.random.default_rng(0)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            value = (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        else:
            value = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(value, leaf.sharding)

    state = jax.tree.map(fill, abstract)
    with checkpointing.create_checkpoint_manager(workdir, config) as manager:
        checkpointing.save_checkpoint(manager, step, state, config, force=True)
        manager.wait_until_finished()


def test_evaluate_bits_per_dim(small_config, tmp_path):
    config = small_config
    workdir = str(tmp_path)
    _write_checkpoint(config, workdir)
    config.eval.num_images = 5
    config.eval.global_batch_size = 4  # Two batches; the second has 3 padding rows.
    result = evaluate.evaluate(config, workdir)

    assert result['step'] == 3 and result['num_images'] == 5
    assert np.isfinite(result['total_bpd']) and result['total_bpd'] > 0
    assert 0 <= result['prior_bpd'] < result['total_bpd']
    quarters = [result[f'vb_q{q}'] for q in range(4)]
    assert all(np.isfinite(quarters)) and all(q > 0 for q in quarters)
    # The bound decomposes: L_T + sum of the per-step terms, grouped by quarter.
    np.testing.assert_allclose(result['prior_bpd'] + sum(quarters), result['total_bpd'],
                               rtol=1e-6)
    np.testing.assert_allclose(sum(result['vb_per_step'][:5]), result['vb_q0'], rtol=1e-6)
    assert len(result['vb_per_step']) == config.diffusion.num_timesteps
    written = json.loads((tmp_path / 'eval_3.json').read_text())
    assert written == result  # JSON floats round-trip exactly.

    # Each image's noise depends on its index only and padding rows never count: one
    # batch of 12 (7 padding rows) gives the same bound as two batches of 4.
    config.eval.global_batch_size = 12
    again = evaluate.evaluate(config, workdir)
    assert again['num_images'] == 5
    for key in ('total_bpd', 'prior_bpd', 'vb_q0', 'vb_q3'):
        np.testing.assert_allclose(again[key], result[key], rtol=1e-5)


def test_evaluate_rejects_bad_batch(small_config, tmp_path):
    small_config.eval.global_batch_size = 6  # Not a multiple of the 4 devices.
    with pytest.raises(ValueError, match='eval.global_batch_size'):
        evaluate.evaluate(small_config, str(tmp_path))


def test_evaluate_refuses_what_it_cannot_score_before_restoring(small_config, tmp_path,
                                                                monkeypatch):
    """An unknown `data.eval_split` and a workdir without checkpoints stop with one
    line before a model is built or a checkpoint restored (a task without bits/dim
    already in `config_lib.validate`: test_config_lib)."""
    def no_restore(*args, **kwargs):
        raise AssertionError('a model was built or restored before the check')

    monkeypatch.setattr(checkpointing, 'restore_for_inference', no_restore)
    monkeypatch.setattr(evaluate, 'create_model', no_restore)
    small_config.data.eval_split = 'nonexistent_split'
    with pytest.raises(ValueError, match=r"^data.eval_split='nonexistent_split' is not a "
                                         r"split of data.dataset='digits'"):
        evaluate.evaluate(small_config, str(tmp_path))
    small_config.data.eval_split = 'test'
    with pytest.raises(FileNotFoundError, match=r'^No checkpoint in '):
        evaluate.evaluate(small_config, str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_summarize_quarters():
    sums = {'count': np.float64(2.0), 'total_bpd': np.float64(30.0),
            'prior_bpd': np.float64(2.0),
            'vb': np.arange(8, dtype=np.float64) * 2.0,  # Means 0, 1, ..., 7.
            'mse': np.ones(8) * 4.0}
    result = evaluate.summarize(sums, step=7)
    assert result['total_bpd'] == 15.0 and result['prior_bpd'] == 1.0
    # N = 8 steps: quarter q holds steps 2q and 2q + 1.
    assert [result[f'vb_q{q}'] for q in range(4)] == [1.0, 5.0, 9.0, 13.0]
    assert result['mse_q2'] == 2.0 and result['num_images'] == 2


# --- images ------------------------------------------------------------------------------
