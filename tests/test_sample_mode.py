"""Tests for ddpm_jax.sample_mode (`--mode=sample`): files written, labels, guidance."""

import json

import numpy as np
import PIL.Image
import pytest

from ddpm_jax import sample_mode, train
from conftest import make_classifier_config, make_conditional


def test_sample_and_save_end_to_end(small_config, tmp_path):
    config = make_conditional(small_config, num_classes=10)  # The digits' classes.
    config.train.num_train_steps = 2
    config.train.checkpoint_every_steps = 2
    config.train.num_grid_samples = 4
    workdir = str(tmp_path / 'run')
    train.run_training(config, workdir)
    # The trainer wrote its final grid through the diffusion task's grid function.
    grid = np.asarray(PIL.Image.open(tmp_path / 'run' / 'samples' / 'step_2.png'))
    # 4 images, 4x upscaled 8x8 -> 32 px, 2 columns (10 classes do not fit) and 1 px gaps.
    assert grid.shape == (2 * 33 + 1, 2 * 33 + 1)

    config.sample.num_images = 6  # Two batches of 4, the second padded.
    config.sample.global_batch_size = 4
    result = sample_mode.sample_and_save(config, workdir)
    assert result['step'] == 2
    with np.load(result['npz']) as f:
        images, labels = f['images'], f['labels']
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert labels.dtype == np.int32 and labels.shape == (6,)
    assert np.all((labels >= 0) & (labels < 10))
    assert images.std() > 1.0  # Not blank.
    png = np.asarray(PIL.Image.open(result['png']))
    assert png.shape == (2 * 33 + 1, 3 * 33 + 1)  # 6 images in 3 columns.

    # A second run never overwrites the first: it gets the next free name.
    config.sample.label = 7
    again = sample_mode.sample_and_save(config, workdir)
    assert again['npz'].endswith('samples_2_1.npz') and again['png'].endswith('samples_2_1.png')
    with np.load(again['npz']) as f:
        np.testing.assert_array_equal(f['labels'], np.full(6, 7, np.int32))
    with np.load(result['npz']) as f:
        np.testing.assert_array_equal(f['images'], images)  # The first file is intact.
    runs = (tmp_path / 'run' / 'runs.jsonl').read_text().splitlines()
    assert [json.loads(r)['mode'] for r in runs] == ['train', 'sample', 'sample']
    assert json.loads(runs[-1])['outputs']['npz'] == again['npz']

    # Truncated as guided-diffusion's scripts write them: the same samples, every pixel
    # the rounded one or one level below, some below.
    config.sample.quantize = 'truncate'
    truncated = sample_mode.sample_and_save(config, workdir)
    config.sample.quantize = 'round'
    with np.load(again['npz']) as f, np.load(truncated['npz']) as g:
        below = f['images'].astype(int) - g['images'].astype(int)
    assert set(np.unique(below)) == {0, 1}

    config.sample.classifier_scale = 1.0
    with pytest.raises(ValueError, match='sample.classifier_workdir'):
        sample_mode.sample_and_save(config, workdir)
    config.sample.classifier_workdir = str(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match='sample.classifier_workdir'):
        sample_mode.sample_and_save(config, workdir)

    with np.load(again['npz']) as f:
        unguided = f['images']

    # Classifier guidance from a classifier trained by the same trainer.
    classifier_config = make_classifier_config(config, num_classes=10)
    classifier_config.train.num_grid_samples = 0
    classifier_config.optim.learning_rate = 0.05  # Two big steps: a non-zero gradient.
    classifier_workdir = str(tmp_path / 'classifier')
    train.run_training(classifier_config, classifier_workdir)
    config.sample.classifier_workdir = classifier_workdir
    config.sample.classifier_scale = 100.0
    guided = sample_mode.sample_and_save(config, workdir)
    with np.load(guided['npz']) as f:
        np.testing.assert_array_equal(f['labels'], np.full(6, 7, np.int32))
        assert f['images'].shape == (6, 8, 8, 1)
        assert np.abs(f['images'].astype(int) - unguided.astype(int)).max() > 0


def test_sample_mode_on_a_missing_workdir_creates_nothing(small_config, tmp_path):
    with pytest.raises(FileNotFoundError, match='never create'):
        sample_mode.sample_and_save(small_config, str(tmp_path / 'missing'))
    assert not (tmp_path / 'missing').exists()
