"""Tests for ddpm_jax.data: sources, preprocessing, sharding, resume, global batches."""

import io
import json
import os
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from configs import default
from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import data

TINY_NAME = 'ddpm_jax_tiny_images'  # Matches the builder class name below.
TINY_SPLITS = {'train': 12, 'test': 5}


def _tiny_image(split: str, i: int) -> np.ndarray:
    """The uint8 [6, 10, 3] image number i of the tiny on-disk dataset."""
    return np.random.default_rng([len(split), i]).integers(0, 256, (6, 10, 3), dtype=np.uint8)


class DdpmJaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny real TFDS dataset (non-square RGB PNGs, 3 classes), built without TF."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
        }), disable_shuffling=True)  # Keep key order on disk, so tests know example i.

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in TINY_SPLITS}

    def _generate_examples(self, split):
        for i in range(TINY_SPLITS[split]):
            encoded = io.BytesIO()
            PIL.Image.fromarray(_tiny_image(split, i)).save(encoded, format='PNG')
            yield i, {'image': encoded.getvalue(), 'label': i % 3}


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    builder = DdpmJaxTinyImages(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def _digits():
    digits = sk_datasets.load_digits()
    return digits.images.astype(np.float64), digits.target


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _rows(batches):
    """Sorted list of (image bytes, label) over a list of batches: a multiset."""
    return sorted((image.tobytes(), int(label)) for b in batches
                  for image, label in zip(b['image'], b['label']))


def test_digits_train_batches(tiny_config):
    it = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    batches = _take(it, 20)
    for batch in batches:
        assert batch['image'].shape == (8, 8, 8, 1) and batch['image'].dtype == np.float32
        assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    images = np.stack([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    assert images.min() == -1.0 and images.max() == 1.0  # 0 -> -1 and 16 -> +1 exactly.
    # Pixels are k/8 - 1 for integer k in 0..16.
    np.testing.assert_array_equal((images + 1) * 8, np.round((images + 1) * 8))
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) > 5
    assert data.dataset_info(tiny_config) == {'num_examples': 1500, 'num_classes': 10}


def test_digits_eval_matches_sklearn_test_split(tiny_config):
    tiny_config.eval.num_images = 10_000  # More than the split: the whole split.
    tiny_config.eval.global_batch_size = 64
    batches = list(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    assert len(batches) == 5  # ceil(297 / 64)
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.dtype == bool and mask.sum() == 297 and mask[:297].all()
    ref_images, ref_labels = _digits()
    np.testing.assert_array_equal(images[:297, ..., 0], ref_images[1500:] / 8 - 1)
    np.testing.assert_array_equal(labels[:297], ref_labels[1500:])
    np.testing.assert_array_equal(images[297:], 0.0)  # Padding rows.
    np.testing.assert_array_equal(labels[297:], 0)


def test_eval_limits_to_num_images(tiny_config):
    tiny_config.eval.num_images = 10
    tiny_config.eval.global_batch_size = 4
    batches = list(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    assert len(batches) == 3
    assert [int(b['mask'].sum()) for b in batches] == [4, 4, 2]


def test_eval_shards_concatenate_to_single_process_batches(tiny_config):
    tiny_config.eval.num_images = 30
    tiny_config.eval.global_batch_size = 8
    single = list(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    shards = [list(data.create_eval_iterator(tiny_config, process_index=p, process_count=2))
              for p in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 4
    for j, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(
                batch[key], np.concatenate([shards[0][j][key], shards[1][j][key]]))


def test_determinism_and_seeds(tiny_config):
    first = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 3)
    again = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 3)
    _assert_batches_equal(first, again)
    tiny_config.seed = 1
    other = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 3)
    assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_random_flip_flips_some_examples(tiny_config):
    tiny_config.data.random_flip = True
    flipped = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 8)
    tiny_config.data.random_flip = False
    plain = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 8)
    num_flipped = num_same = 0
    for f, p in zip(flipped, plain):
        np.testing.assert_array_equal(f['label'], p['label'])  # Same order.
        for fi, pi in zip(f['image'], p['image']):
            if np.array_equal(fi, pi[:, ::-1]) and not np.array_equal(fi, pi):
                num_flipped += 1
            else:
                np.testing.assert_array_equal(fi, pi)
                num_same += 1
    assert num_flipped > 10 and num_same > 10  # 64 examples, p = 1/2 each.


def test_epochs_cover_split_and_reshuffle(tiny_config):
    tiny_config.data.random_flip = False
    tiny_config.train.global_batch_size = 100
    it = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    epoch1, epoch2 = _take(it, 15), _take(it, 15)
    ref_images, ref_labels = _digits()
    ref = _rows([{'image': (ref_images[:1500, ..., None] / 8 - 1).astype(np.float32),
                  'label': ref_labels[:1500]}])
    assert _rows(epoch1) == ref and _rows(epoch2) == ref
    assert not np.array_equal(epoch1[0]['label'], epoch2[0]['label'])


def test_two_processes_read_disjoint_shards(tiny_config):
    tiny_config.data.random_flip = False
    tiny_config.train.global_batch_size = 20  # Local batch 10: 75 batches = 750 examples.
    shards = [_take(data.create_train_iterator(tiny_config, process_index=p, process_count=2),
                    75) for p in range(2)]
    ref_images, ref_labels = _digits()
    for p, shard in enumerate(shards):
        assert shard[0]['image'].shape == (10, 8, 8, 1)
        ref_shard = {'image': (ref_images[p:1500:2, ..., None] / 8 - 1).astype(np.float32),
                     'label': ref_labels[p:1500:2]}
        assert _rows(shard) == _rows([ref_shard])
    ref = {'image': (ref_images[:1500, ..., None] / 8 - 1).astype(np.float32),
           'label': ref_labels[:1500]}
    assert _rows(shards[0] + shards[1]) == _rows([ref])


def test_batch_not_divisible_by_processes(tiny_config):
    tiny_config.train.global_batch_size = 10
    with pytest.raises(ValueError, match='global_batch_size=10'):
        data.create_train_iterator(tiny_config, process_index=0, process_count=4)
    with pytest.raises(ValueError, match='process_index=2'):
        data.create_train_iterator(tiny_config, process_index=2, process_count=2)


def test_state_round_trip_through_json(tiny_config, tmp_path):
    it = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    _take(it, 3)
    path = tmp_path / 'state.json'
    path.write_text(json.dumps(it.get_state()))
    expected = _take(it, 2)
    fresh = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    fresh.set_state(json.loads(path.read_text()))
    _assert_batches_equal(_take(fresh, 2), expected)


def test_state_round_trip_through_orbax_checkpoint_manager(tiny_config, tmp_path):
    it = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    _take(it, 3)
    params = {'w': np.arange(3.0, dtype=np.float32)}
    manager = ocp.CheckpointManager(tmp_path / 'ckpt')
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)))
    expected = _take(it, 2)  # Advancing after save() must not change what is saved.
    manager.wait_until_finished()
    manager.close()

    fresh = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    manager = ocp.CheckpointManager(tmp_path / 'ckpt')
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
    manager.close()
    np.testing.assert_array_equal(restored['state']['w'], params['w'])
    _assert_batches_equal(_take(fresh, 2), expected)


def test_digits_resized_rgb(tiny_config):
    tiny_config.data.image_size = 16
    tiny_config.data.channels = 3
    batch = next(data.create_train_iterator(tiny_config, process_index=0, process_count=1))
    image = batch['image']
    assert image.shape == (8, 16, 16, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.max() > 0.5
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Grey repeated.


def test_fake_source(tiny_config):
    tiny_config.data.dataset = 'fake'
    tiny_config.data.image_size = 16
    tiny_config.data.channels = 3
    tiny_config.model.num_classes = 4
    a = next(data.create_train_iterator(tiny_config, process_index=0, process_count=1))
    b = next(data.create_train_iterator(tiny_config, process_index=0, process_count=1))
    _assert_batches_equal([a], [b])
    assert a['image'].shape == (8, 16, 16, 3) and a['label'].dtype == np.int32
    assert a['image'].min() >= -1 and a['image'].max() <= 1 and a['image'].std() > 0.3
    assert set(a['label'].tolist()) <= set(range(4))
    assert data.dataset_info(tiny_config) == {
        'num_examples': data.FAKE_SPLIT_SIZES['train'], 'num_classes': 4}


def test_tfds_array_record_on_disk(tiny_config, tiny_data_dir):
    tiny_config.data.dataset = TINY_NAME
    tiny_config.data.data_dir = tiny_data_dir
    tiny_config.data.image_size = 6
    tiny_config.data.channels = 3
    tiny_config.data.center_crop = True  # 6x10 -> the middle 6x6, no resize.
    tiny_config.eval.num_images = 100
    tiny_config.eval.global_batch_size = 4
    assert data.dataset_info(tiny_config) == {'num_examples': 12, 'num_classes': 3}
    batches = list(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    assert len(batches) == 2 and images.shape == (8, 6, 6, 3)
    for i in range(TINY_SPLITS['test']):
        expected = _tiny_image('test', i)[:, 2:8].astype(np.float64) / 127.5 - 1
        np.testing.assert_allclose(images[i], expected, rtol=0, atol=1e-6)
        assert labels[i] == i % 3

    tiny_config.data.channels = 1  # RGB -> ITU-R 601 luma.
    batch = next(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    luma = _tiny_image('test', 0)[:, 2:8].astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(batch['image'][0, ..., 0], luma / 127.5 - 1, atol=1e-5)

    tiny_config.data.image_size = 3
    batch = next(data.create_train_iterator(tiny_config, process_index=0, process_count=1))
    assert batch['image'].shape == (8, 3, 3, 1) and set(batch['label'].tolist()) <= {0, 1, 2}
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_tfds_mock_data_cifar10(tiny_config):
    tiny_config.data.dataset = 'cifar10'
    tiny_config.data.channels = 3
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        assert data.dataset_info(tiny_config) == {'num_examples': 16, 'num_classes': 10}
        batch = next(data.create_train_iterator(tiny_config, process_index=1, process_count=2))
    assert batch['image'].shape == (4, 8, 8, 3) and batch['label'].dtype == np.int32
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1


def test_missing_tfds_dataset_fails_fast(tiny_config, tmp_path):
    tiny_config.data.dataset = 'cifar10'
    tiny_config.data.data_dir = str(tmp_path)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f'tfds build cifar10 --data_dir={tmp_path}' in message
    assert f'--config.data.data_dir={tmp_path}' in message
    assert os.listdir(tmp_path) == []  # Nothing was built or downloaded.
    tiny_config.data.dataset = 'no_such_dataset_xyz'
    with pytest.raises(FileNotFoundError, match='no_such_dataset_xyz'):
        data.dataset_info(tiny_config)


@pytest.mark.parametrize('dataset', ['digits', 'fake', TINY_NAME])
def test_an_unknown_split_names_its_config_field(tiny_config, tiny_data_dir, dataset):
    """Every reader of a split names the field the split came from, in one line."""
    tiny_config.data.dataset, tiny_config.data.data_dir = dataset, tiny_data_dir
    bad = 'nonexistent_split'
    tiny_config.data.split = tiny_config.data.eval_split = bad
    cases = [
        ('data.split', lambda: data.dataset_info(tiny_config)),
        ('data.split', lambda: data.create_train_iterator(tiny_config, process_index=0,
                                                          process_count=1)),
        ('data.eval_split', lambda: data.create_eval_iterator(tiny_config, process_index=0,
                                                              process_count=1)),
        ('eval.fid_reference_split', lambda: data.create_eval_iterator(
            tiny_config, process_index=0, process_count=1,
            split_field='eval.fid_reference_split')),
        ('eval.fid_reference_split', lambda: data.check_split(
            tiny_config, bad, 'eval.fid_reference_split')),
    ]
    for field, call in cases:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{field}='{bad}' is not a split of ")
        assert f"data.dataset='{dataset}'" in message and "'train', 'test'" in message
        assert '\n' not in message
    data.check_split(tiny_config, 'test', 'data.eval_split')  # A real split passes.


@pytest.mark.slow
def test_worker_processes_give_same_batches_and_resume(tiny_config):
    from absl import flags  # grain's worker processes read absl flags.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    expected = _take(data.create_train_iterator(tiny_config, process_index=0, process_count=1), 5)
    tiny_config.data.num_workers = 2
    it = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    _assert_batches_equal(_take(it, 3), expected[:3])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    fresh = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 2), expected[3:])
    fresh.close()


def test_wordnet_labels_are_numbered_in_sorted_id_order():
    """TFDS's imagenet_resized keeps Chrabaszcz et al.'s class order (label 0 is
    n02119789, kit fox); guided-diffusion and TFDS imagenet2012 number the same 1000
    WordNet IDs in sorted order (kit fox is 278, tench n01440764 is 0)."""
    path = os.path.join(os.path.dirname(tfds.__file__), 'image_classification',
                        'imagenet_resized_labels.txt')
    with open(path) as f:
        names = f.read().split()
    assert len(names) == 1000 and names[0] == 'n02119789' and names != sorted(names)
    order = data.wordnet_label_order(names)
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))
    assert order[0] == 278 and order[names.index('n01440764')] == 0
    assert all(sorted(names)[order[i]] == n for i, n in enumerate(names))
    assert data.wordnet_label_order(sorted(names)) is None  # imagenet2012: as it is.
    assert data.wordnet_label_order(['cat', 'dog']) is None
    source = data._Source(records=None, max_value=255.0, num_classes=1000,
                          label_order=order)
    tiny = default.get_config()
    tiny.data.image_size, tiny.data.channels = 4, 3
    preprocess = data._make_preprocess_fn(source, tiny)
    out = preprocess({'image': np.zeros((4, 4, 3), np.uint8), 'label': np.int64(0)})
    assert out['label'] == 278 and out['label'].dtype == np.int32


def test_runs_on_imagenet_resized_before_the_renumbering_keep_their_labels():
    """An imagenet_resized record without data.wordnet_label_order trained on TFDS's
    order: resuming it with today's config is refused by name; other datasets' old
    records still match."""
    from configs import default, imagenet64
    for get_config, refused in ((imagenet64.get_config, True), (default.get_config, False)):
        old = config_lib.to_json_dict(get_config())
        del old['data']['wordnet_label_order']
        assert config_lib.upgrade_json_dict(old)['data']['wordnet_label_order'] != refused
        if refused:
            with pytest.raises(checkpointing.CheckpointMismatchError,
                               match=r'data.wordnet_label_order: checkpoint=False, config=True'):
                checkpointing.check_config_compatible(old, get_config())
        else:
            checkpointing.check_config_compatible(old, get_config())


def _box_halve(image):
    """PIL's BOX halving of uint8 [H, W, C] (even sides): the horizontal pass, rounded
    half up to uint8, then the vertical pass, rounded again."""
    x = image.astype(np.int64)
    x = (x[:, 0::2] + x[:, 1::2] + 1) // 2
    return (x[0::2] + x[1::2] + 1) // 2


def test_adm_center_crop_arr_is_guided_diffusions():
    """center_crop_arr: BOX halvings while the short side >= 2 S, the bicubic resize of
    the short side to S (none when it already is S), the uint8 centre square."""
    image = np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    # 24x36 -> 12x18 -> 6x9 (6 < 12 stops), no resize, columns (9 - 6) // 2 = 1 on.
    expected = _box_halve(_box_halve(image))[:, 1:7]
    np.testing.assert_array_equal(data.center_crop_arr(image, 6), expected)
    # Already S x S (imagenet_resized): unchanged; grey stays one channel.
    np.testing.assert_array_equal(data.center_crop_arr(image[:6, :6], 6), image[:6, :6])
    grey = data.center_crop_arr(image[..., :1], 6)
    np.testing.assert_array_equal(grey, expected[..., :1])
    # A real resize (20x30 -> 10x15 -> bicubic to 8x12, columns 2..9): a constant stays.
    flat = np.full((20, 30, 3), 77, np.uint8)
    np.testing.assert_array_equal(data.center_crop_arr(flat, 8), np.full((8, 8, 3), 77))
    with pytest.raises(ValueError, match='8-bit'):
        data.center_crop_arr(image.astype(np.float32), 6)


def test_adm_random_crop_arr_draws_side_and_position():
    """random_crop_arr at S = 8 on an 8x8 image: the short side is drawn from {8, 9, 10}
    and only side 8 at offset (0, 0) returns the image itself (1/3 of draws)."""
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outs = [data.random_crop_arr(image, 8, np.random.default_rng(seed)) for seed in range(150)]
    assert all(o.shape == (8, 8, 3) and o.dtype == np.uint8 for o in outs)
    same = sum(np.array_equal(o, image) for o in outs)
    assert 30 <= same <= 70, same
    assert len({o.tobytes() for o in outs}) > 10  # Sides and positions vary.
    flat = np.full((12, 20, 3), 9, np.uint8)
    np.testing.assert_array_equal(data.random_crop_arr(flat, 8, np.random.default_rng(3)),
                                  np.full((8, 8, 3), 9))


def test_adm_preprocessing_on_tfds_and_random_crops_in_training(tiny_config, tiny_data_dir):
    tiny_config.data.dataset = TINY_NAME
    tiny_config.data.data_dir = tiny_data_dir
    tiny_config.data.image_size = 3
    tiny_config.data.channels = 3
    tiny_config.data.center_crop = True
    tiny_config.data.resize = 'adm'
    tiny_config.eval.num_images = 5
    tiny_config.eval.global_batch_size = 5
    config_lib._validate_data(tiny_config)  # Valid (3x3 is too small for the model).
    batch = next(data.create_eval_iterator(tiny_config, process_index=0, process_count=1))
    for i in range(TINY_SPLITS['test']):
        # 6x10 -> 3x5 (BOX), no resize, columns 1..3; p / 127.5 - 1 as guided-diffusion.
        pixels = _box_halve(_tiny_image('test', i))[:, 1:4].astype(np.float32)
        np.testing.assert_array_equal(batch['image'][i], pixels / np.float32(127.5) - 1)

    tiny_config.data.random_flip = False
    tiny_config.train.global_batch_size = 12
    centred = next(data.create_train_iterator(tiny_config, process_index=0, process_count=1))
    tiny_config.data.random_crop = True
    config_lib._validate_data(tiny_config)
    iterator = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    cropped = next(iterator)
    state = iterator.get_state()
    following = _take(iterator, 2)
    np.testing.assert_array_equal(cropped['label'], centred['label'])  # Same order.
    assert not np.array_equal(cropped['image'], centred['image'])
    assert cropped['image'].shape == (12, 3, 3, 3)
    again = data.create_train_iterator(tiny_config, process_index=0, process_count=1)
    again.set_state(state)
    _assert_batches_equal(_take(again, 2), following)
    # Evaluation never crops at random.
    batch_again = next(data.create_eval_iterator(tiny_config, process_index=0,
                                                 process_count=1))
    np.testing.assert_array_equal(batch_again['image'], batch['image'])


@pytest.mark.parametrize('fields, match', [
    ({'resize': 'area'}, r"data.resize='area' is not valid.*'bicubic', 'adm'"),
    ({'resize': 'adm'}, r"set data.center_crop=True"),
    ({'resize': 'adm', 'center_crop': True}, r"digits are 0..16"),
    ({'random_crop': True}, r"data.random_crop=True .* needs data.resize='adm'"),
])
def test_adm_preprocessing_fields_are_checked(tiny_config, fields, match):
    for name, value in fields.items():
        tiny_config.data[name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config, mode='train', num_devices=1)
