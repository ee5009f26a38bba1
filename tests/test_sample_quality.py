"""Tests for ddpm_jax.sample_quality: sharded features, streaming statistics, reference
files and `--mode=fid`, on the bundled digits network (no download)."""

import json

import jax
import numpy as np
import pytest

from configs import default
from ddpm_jax import config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import images as images_lib
from ddpm_jax import metrics
from ddpm_jax import parallel
from ddpm_jax import sample_quality
from ddpm_jax import torch_checkpoint
from ddpm_jax import train
from ddpm_jax.models import inception
from conftest import make_classifier_config
from test_inception import random_variables  # Random weights of the real file's shapes.


def _digits_uint8(split):
    images, labels = data_lib.load_digits(split)
    return np.round((images + 1) * 127.5).astype(np.uint8), labels


@pytest.fixture
def fid_config(small_config):
    config = small_config
    config.eval.metrics_network = 'digits'
    config.eval.fid_batch_size = 100
    config.eval.fid_reference_split = 'test'
    config.eval.fid_reference_num_images = 297
    config.eval.fid_num_samples = 100
    return config


def test_sharded_features_equal_one_device(fid_config):
    images, _ = _digits_uint8('test')
    batch = images[:16]
    four = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh())
    one = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh(jax.devices()[:1]))
    out4 = four(parallel.shard_host_array(batch, four.mesh))
    out1 = one(parallel.shard_host_array(batch, one.mesh))
    assert out4['features'].shape == (16, 64) and out4['logits'].shape == (16, 10)
    for key in out1:
        np.testing.assert_allclose(out4[key], out1[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['round', 'truncate'])
def test_samples_quantised_on_devices_as_the_npz_files(fid_config, mode):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.1, 1.1, 4000),
                        np.arange(256) / 127.5 - 1.0]).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(sample_quality.quantize_to_uint8(x, mode)), images_lib.to_uint8(x, mode))
    extractor = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh())
    samples = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    floats = extractor(parallel.shard_host_array(samples, extractor.mesh),
                       quantize=mode)
    pixels = extractor(parallel.shard_host_array(images_lib.to_uint8(samples, mode),
                                                 extractor.mesh))
    other = extractor(parallel.shard_host_array(
        images_lib.to_uint8(samples, 'truncate' if mode == 'round' else 'round'),
        extractor.mesh))
    np.testing.assert_array_equal(floats['features'], pixels['features'])
    assert np.abs(floats['features'] - other['features']).max() > 1e-4


def test_streaming_with_padding_equals_one_pass(fid_config):
    extractor = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh())
    images, _ = _digits_uint8('test')
    streamed = sample_quality.FeatureAccumulator()
    sample_quality._features_of_images(extractor, images, 36, streamed)  # 297 = 8*36 + 9.
    result = streamed.result()
    whole = extractor(parallel.shard_host_array(images[:296], extractor.mesh))['features']
    last = extractor(parallel.shard_host_array(images[-4:], extractor.mesh))['features'][-1:]
    features = np.concatenate([whole, last]).astype(np.float64)
    assert result['features'].shape == (297, 64) and streamed.count == 297
    np.testing.assert_allclose(result['mu'], features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result['sigma'], np.cov(features, rowvar=False), rtol=1e-4,
                               atol=1e-6)


def test_samples_npz_scored_against_reference(fid_config, tmp_path):
    """The held-out digits scored against themselves: FID 0, precision = recall = 1,
    their labels read back; uniform noise is far away."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    images, labels = _digits_uint8('test')
    np.savez(tmp_path / 'real.npz', images=images, labels=labels)
    fid_config.eval.fid_samples = str(tmp_path / 'real.npz')
    result = sample_quality.evaluate_samples(fid_config, str(workdir))
    assert abs(result['fid']) < 1e-6
    assert result['precision'] == 1.0 and result['recall'] == 1.0
    assert result['label_accuracy'] > 0.95 and result['num_samples'] == 297
    assert json.loads((workdir / 'metrics_npz.json').read_text())['fid'] == result['fid']
    cached = list(workdir.glob('fid_reference_digits_test_8px_digits_297.npz'))
    assert len(cached) == 1  # Computed once, then read from the workdir.

    noise = np.random.default_rng(0).integers(0, 256, (297, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / 'noise.npz', images=noise)
    fid_config.eval.fid_samples = str(tmp_path / 'noise.npz')
    bad = sample_quality.evaluate_samples(fid_config, str(workdir))
    assert bad['fid'] > 100 * max(result['fid'], 1e-3) and bad['fid'] > 10
    assert bad['precision'] < 0.1
    assert (workdir / 'metrics_npz_1.json').exists()  # The first result is kept.


def test_adm_reference_batch_is_read_as_published(fid_config, tmp_path, caplog):
    images, _ = _digits_uint8('test')
    mu, sigma = np.full(64, 0.5), np.eye(64)
    np.savez(tmp_path / 'ref.npz', arr_0=images, mu=mu, sigma=sigma)
    extractor = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh())
    # Other features than the published statistics' (the TF graph's): recomputed.
    assert not extractor.computes_adm_features
    with caplog.at_level('WARNING', logger='ddpm_jax'):
        ref = sample_quality.load_reference_npz(str(tmp_path / 'ref.npz'), extractor, 100)
    assert 'recomputed from its images' in caplog.text and 'mu/sigma' in caplog.text
    accumulator = sample_quality.FeatureAccumulator()
    sample_quality._features_of_images(extractor, images, 100, accumulator)
    np.testing.assert_allclose(ref['mu'], accumulator.result()['mu'], rtol=1e-6)
    assert np.abs(ref['mu'] - mu).max() > 0.1
    # The ADM evaluator's features (Inception, eval.inception_input='tf'): as published.
    extractor.computes_adm_features = True
    ref = sample_quality.load_reference_npz(str(tmp_path / 'ref.npz'), extractor, 100)
    np.testing.assert_array_equal(ref['mu'], mu)  # The stored statistics win.
    np.testing.assert_array_equal(ref['sigma'], sigma)
    assert ref['features'].shape == (297, 64)  # Features for precision/recall.
    np.savez(tmp_path / 'empty.npz', x=np.zeros(3))
    with pytest.raises(ValueError, match="neither reference images"):
        sample_quality.load_reference_npz(str(tmp_path / 'empty.npz'), extractor, 100)


def _bad_inputs(tmp_path):
    """(eval fields, error, message pattern) of inputs --mode=fid must refuse up front."""
    images, labels = _digits_uint8('test')
    files = {'real': {'images': images, 'labels': labels},
             'wrongshape': {'images': np.zeros((100, 16, 16, 3), np.uint8)},
             'floats': {'images': images.astype(np.float32)},
             'fewlabels': {'images': images, 'labels': labels[:10]},
             'objects': {'images': np.array([{'a': 1}], dtype=object)},
             'rgb_reference': {'arr_0': np.zeros((100, 16, 16, 3), np.uint8)}}
    paths = {name: str(tmp_path / f'{name}.npz') for name in [*files, 'text']}
    for name, arrays in files.items():
        np.savez(paths[name], **arrays)
    (tmp_path / 'text.npz').write_text('not an archive\n')
    real = {'fid_samples': paths['real']}
    return [
        ({}, FileNotFoundError, r'^No checkpoint in '),
        ({'fid_samples': '/nonexistent.npz'}, FileNotFoundError,
         r"^eval.fid_samples='/nonexistent.npz' does not exist"),
        ({'fid_samples': paths['wrongshape']}, ValueError,
         r"^eval.fid_samples='.*wrongshape.npz' holds 16x16x3 images \('images'\), "
         r'expected 8x8x1 \(data.image_size=8, data.channels=1\)'),
        ({'fid_samples': paths['floats']}, ValueError,
         r"^eval.fid_samples='.*floats.npz': 'images' must be uint8 pixels, got float32"),
        ({'fid_samples': paths['fewlabels']}, ValueError,
         r"^eval.fid_samples='.*fewlabels.npz': 'labels' has shape \(10,\), expected \[297\]"),
        ({'fid_samples': paths['text']}, ValueError,
         r"^eval.fid_samples='.*text.npz' is not a readable .npz of arrays: "),
        ({'fid_samples': paths['objects']}, ValueError,
         r"^eval.fid_samples='.*objects.npz' is not a readable .npz of arrays: .*object"),
        ({**real, 'fid_reference': paths['text']}, ValueError,
         r"^eval.fid_reference='.*text.npz' is not a readable .npz of arrays: "),
        ({**real, 'fid_reference': paths['objects']}, ValueError,
         r"^eval.fid_reference='.*objects.npz' is not a readable .npz of arrays: .*[Oo]bject"),
        ({**real, 'fid_reference': paths['rgb_reference']}, ValueError,
         r"^eval.fid_reference='.*rgb_reference.npz': 'arr_0' holds 16x16x3 images, but "
         r"eval.metrics_network='digits' scores square grey images"),
        ({**real, 'fid_reference_split': 'nonexistent_split'}, ValueError,
         r"^eval.fid_reference_split='nonexistent_split' is not a split of "
         r"data.dataset='digits'"),
    ]


def test_fid_inputs_are_refused_before_the_reference_is_built(fid_config, tmp_path,
                                                              monkeypatch):
    """A missing checkpoint, a missing, unreadable or wrongly shaped samples or reference
    file and an unknown reference split each stop --mode=fid with one line naming the
    field and the file, before a model state or the feature network is built or the
    workdir written."""
    def no_features(*args, **kwargs):
        raise AssertionError('the feature network was built before the check')

    def no_restore(*args, **kwargs):
        raise AssertionError('the restore built the model state before the check')

    monkeypatch.setattr(sample_quality, 'FeatureExtractor', no_features)
    monkeypatch.setattr(sample_quality.checkpointing, 'restore_for_inference', no_restore)
    workdir = tmp_path / 'run'
    workdir.mkdir()
    for fields, error, match in _bad_inputs(tmp_path):
        config = fid_config.copy_and_resolve_references()
        config.eval.update(fields)
        with pytest.raises(error, match=match) as info:
            sample_quality.evaluate_samples(config, str(workdir))
        assert '\n' not in str(info.value), fields
        assert not list(workdir.iterdir()), fields


def test_fid_of_a_trained_workdir_and_during_training(fid_config, tmp_path, capsys):
    config = fid_config
    config.model.num_classes = 10
    config.train.num_train_steps = 2
    config.train.num_grid_samples = 0
    config.train.fid_every_steps = 2
    config.train.fid_num_samples = 100
    config.sample.respacing = '5'
    workdir = str(tmp_path / 'run')
    train.run_training(config, workdir, mesh=parallel.create_mesh())
    assert 'fid/fid=' in capsys.readouterr().out
    result = sample_quality.evaluate_samples(config, workdir)
    assert result['step'] == 2 and result['num_samples'] == 100
    assert result['label_accuracy'] < 0.5  # Two steps of training: not yet the labels.
    # An untrained model is far from the data (the real digits score 0 here).
    assert result['fid'] > 10
    # Classifier guidance samples as --mode=sample does (ADM-G's published FIDs are of
    # guided samples): a classifier trained by the same trainer moves the score.
    classifier_config = make_classifier_config(config, num_classes=10)
    classifier_config.train.fid_every_steps = 0
    classifier_config.optim.learning_rate = 0.05  # Two big steps: a non-zero gradient.
    classifier_workdir = str(tmp_path / 'classifier')
    train.run_training(classifier_config, classifier_workdir, mesh=parallel.create_mesh())
    config.sample.classifier_scale = 100.0
    with pytest.raises(ValueError, match='needs sample.classifier_workdir'):
        sample_quality.evaluate_samples(config, workdir)
    config.sample.classifier_workdir = classifier_workdir
    guided = sample_quality.evaluate_samples(config, workdir)
    assert guided['num_samples'] == 100 and guided['fid'] != result['fid']


def test_missing_inception_weights_stop_before_anything_runs(fid_config, monkeypatch):
    monkeypatch.delenv(inception.INCEPTION_ENV_VAR, raising=False)
    fid_config.eval.metrics_network = 'inception'
    with pytest.raises(FileNotFoundError) as info:
        config_lib.validate(fid_config, mode='fid', num_devices=4)
    message = str(info.value)
    assert '\n' not in message and inception.INCEPTION_FILENAME in message
    assert 'eval.inception_path' in message and inception.INCEPTION_ENV_VAR in message


def test_digits_network_only_scores_digit_images(fid_config):
    for field, value in (('image_size', 12), ('channels', 3)):
        config = fid_config.copy_and_resolve_references()
        config.data[field] = value
        with pytest.raises(ValueError, match="metrics_network='digits' scores 8x8 grey"):
            config_lib.validate(config, mode='fid', num_devices=4)


def test_digits_network_block_averages_larger_digits(fid_config):
    """16x16 digits (latent diffusion's) are averaged 2x2 down to the network's 8x8."""
    images, _ = _digits_uint8('test')
    big = images[:8].astype(np.float64).repeat(2, axis=1).repeat(2, axis=2)
    big[:, ::2, ::2] += 3.0  # The 2x2 means are the 8x8 image + 0.75.
    small = images[:8].astype(np.float64) + 0.75
    fid_config.data.image_size = 16
    config_lib.validate(fid_config, mode='fid', num_devices=4)
    extractor = sample_quality.FeatureExtractor(fid_config, parallel.create_mesh())
    out_big = extractor(parallel.shard_host_array(big.astype(np.float32), extractor.mesh))
    out_small = extractor(parallel.shard_host_array(small.astype(np.float32), extractor.mesh))
    np.testing.assert_allclose(out_big['features'], out_small['features'], rtol=1e-4,
                               atol=1e-4)


def test_npz_arrays_are_read_in_place(tmp_path):
    images, _ = _digits_uint8('test')
    np.savez(tmp_path / 'plain.npz', images=images, labels=np.arange(3))
    np.savez_compressed(tmp_path / 'packed.npz', images=images)
    mapped = sample_quality.open_npz_array(str(tmp_path / 'plain.npz'), 'images')
    assert isinstance(mapped, np.memmap)  # Rows are read only when indexed.
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(
        sample_quality.open_npz_array(str(tmp_path / 'packed.npz'), 'images'), images)
    np.testing.assert_array_equal(
        sample_quality.open_npz_array(str(tmp_path / 'plain.npz'), 'labels'), np.arange(3))


def test_inception_features_sharded_equal_one_device(fid_config, tmp_path, monkeypatch):
    """The FID network from a weights file (random values, pytorch-fid's names and
    layout) on 4 devices equals 1 device; pool3, sFID's spatial features and logits."""
    path = tmp_path / inception.INCEPTION_FILENAME
    torch_checkpoint.save_state_dict(
        str(path), inception.torch_state_dict_from_params(random_variables()))
    real_loader = inception.load_inception_variables
    monkeypatch.setattr(inception, 'load_inception_variables',
                        lambda p: real_loader(p, expected_hash_prefix=None))  # Not the real file.
    fid_config.eval.metrics_network = 'inception'
    fid_config.eval.inception_path = str(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    outputs = []
    for mesh in (parallel.create_mesh(), parallel.create_mesh(jax.devices()[:1])):
        extractor = sample_quality.FeatureExtractor(fid_config, mesh)
        outputs.append(extractor(parallel.shard_host_array(images, mesh)))
    assert outputs[0]['features'].shape == (4, 2048)
    assert outputs[0]['spatial'].shape == (4, 17 * 17 * 7)
    assert outputs[0]['logits'].shape == (4, 1008)
    for key in outputs[0]:
        np.testing.assert_allclose(outputs[0][key], outputs[1][key], rtol=1e-4, atol=1e-4)
    # eval.inception_input='tf': the TF graph's resize and scaling, other features.
    fid_config.eval.inception_input = 'tf'
    mesh = parallel.create_mesh(jax.devices()[:1])
    tf_out = sample_quality.FeatureExtractor(fid_config, mesh)(
        parallel.shard_host_array(images, mesh))
    direct = inception.InceptionV3(input_pipeline='tf').apply(
        jax.device_put(real_loader(str(path), expected_hash_prefix=None)), images)
    np.testing.assert_allclose(tf_out['features'], direct['pool3'], rtol=1e-4, atol=1e-4)
    assert np.abs(tf_out['features'] - outputs[1]['features']).max() > 1e-3


@pytest.mark.parametrize('node, label', [(449, 0), (169, 388)])  # Tench; giant panda.
def test_inception_labels_in_imagenet_order(fid_config, tmp_path, monkeypatch, node, label):
    """The TF graph's outputs are not ImageNet's label order: output 449 is tench
    (label 0), 169 the giant panda (label 388). A bias that makes one output win
    predicts that label, for ImageNet data only."""
    assert sorted(inception.IMAGENET_CLASS_OUTPUTS) == list(range(1, 1001))
    variables = random_variables()
    variables['params']['fc']['bias'][node] = 1e6
    path = tmp_path / inception.INCEPTION_FILENAME
    torch_checkpoint.save_state_dict(str(path), inception.torch_state_dict_from_params(variables))
    real_loader = inception.load_inception_variables
    monkeypatch.setattr(inception, 'load_inception_variables',
                        lambda p: real_loader(p, expected_hash_prefix=None))
    fid_config.eval.metrics_network = 'inception'
    fid_config.eval.inception_path = str(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mesh = parallel.create_mesh()
    fid_config.data.dataset = 'imagenet_resized/64x64'  # Not read: only its name.
    out = sample_quality.FeatureExtractor(fid_config, mesh)(
        parallel.shard_host_array(images, mesh))
    np.testing.assert_array_equal(out['predicted_label'], np.full(4, label))
    accumulator = sample_quality.FeatureAccumulator()
    accumulator.update(out, mask=np.array([True, True, False, True]))
    np.testing.assert_array_equal(accumulator.kept['predicted_label'], [np.full(3, label)])
    samples = {'mu': np.zeros(2), 'sigma': np.eye(2), 'logits': out['logits'],
               'predicted_label': out['predicted_label']}
    scores = sample_quality.score(samples, {'mu': np.zeros(2), 'sigma': np.eye(2)},
                                  labels=np.array([label, label, label, (label + 1) % 1000]))
    assert scores['label_accuracy'] == 0.75
    fid_config.data.dataset = 'cifar10'  # CIFAR-10's classes are not the graph's.
    out = sample_quality.FeatureExtractor(fid_config, mesh)(
        parallel.shard_host_array(images, mesh))
    assert 'predicted_label' not in out


def test_inception_score_splits_equal_or_adms_chunks():
    """eval.is_split_size: 0 -> 10 equal splits; 5000 -> the ADM evaluator's chunks of
    5,000 (the last shorter), which differ below 50,000 samples."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12_000, 8)) * 3
    stats = {'mu': np.zeros(2), 'sigma': np.eye(2), 'logits': logits}
    ref = {'mu': np.zeros(2), 'sigma': np.eye(2)}

    def split_scores(bounds):
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = p[lo:hi]
            out.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), 1))))
        return np.mean(out), np.std(out)

    ten = sample_quality.score(stats, ref)
    adm = sample_quality.score(stats, ref, is_split_size=5000)
    np.testing.assert_allclose([ten['inception_score'], ten['inception_score_std']],
                               split_scores(np.arange(0, 12_001, 1200)), rtol=1e-10)
    np.testing.assert_allclose([adm['inception_score'], adm['inception_score_std']],
                               split_scores([0, 5000, 10_000, 12_000]), rtol=1e-10)
    assert abs(adm['inception_score_std'] - ten['inception_score_std']) > 1e-3


def test_scoring_options_pick_the_distances():
    config = default.get_config()
    assert sample_quality.scoring_options(config)['precision_recall_dtype'] == np.float16
    config.eval.metrics_network = 'digits'
    assert sample_quality.scoring_options(config)['precision_recall_dtype'] == np.float32
    config.eval.precision_recall_distances = 'float16'
    assert sample_quality.scoring_options(config)['precision_recall_dtype'] == np.float16


def test_precision_recall_takes_the_first_reference_features():
    """eval.precision_recall_reference_images (10,000: the ADM evaluator's reference
    batches): P/R against the reference's first N features, not all of them."""
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5)).astype(np.float32)
    fake = (rng.normal(size=(40, 5)) * 1.3 + 0.2).astype(np.float32)
    stats = {'mu': np.zeros(2), 'sigma': np.eye(2), 'logits': rng.normal(size=(40, 3))}
    samples, ref = dict(stats, features=fake), dict(stats, features=real)
    first = sample_quality.score(samples, ref, precision_recall_dtype=np.float32,
                                 precision_recall_reference_images=20)
    every = sample_quality.score(samples, ref, precision_recall_dtype=np.float32)
    assert (first['precision'], first['recall']) == metrics.precision_recall(
        real[:20], fake, dtype=np.float32)
    assert (every['precision'], every['recall']) == metrics.precision_recall(
        real, fake, dtype=np.float32)
    assert (first['precision'], first['recall']) != (every['precision'], every['recall'])
    config = default.get_config()
    assert sample_quality.scoring_options(config)['precision_recall_reference_images'] == 10_000
