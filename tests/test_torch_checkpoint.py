"""Tests for ddpm_jax.torch_checkpoint: torch-free reading and writing of torch.save files.

torch is not installed here, so the format is pinned by what torch is known to write:
the pickle opcodes and byte positions `pickletools.dis` shows for a state dict saved by
torch 2.x, the zip record names and contents, and the legacy layout. Round trips then
check every dtype bit for bit; hand-built views check offsets and strides against
numpy indexing; crafted files check that anything else is refused without running.
"""

import hashlib
import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from ddpm_jax import torch_checkpoint as tc

FORMATS = [pytest.param(False, id='zip'), pytest.param(True, id='legacy')]


def _assert_bitwise_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for name, expected in want.items():
        expected = np.asarray(expected)
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), name
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name


def _every_dtype():
    """One array per dtype, with extremes, signed zeros, subnormals, inf and NaN."""
    f32 = np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38], np.float32)
    return OrderedDict([
        ('z.first', np.arange(6, dtype=np.float32).reshape(2, 3)),  # unsorted on purpose
        ('float32', f32),
        ('float64', np.array([np.pi, -0.0, 5e-324, np.nan, -np.inf], np.float64)),
        ('float16', np.array([65504, -0.0, 2.0**-24, np.inf, np.nan, 0.333], np.float16)),
        ('bfloat16', np.array([1.0, -2.5, 3.140625, np.inf, np.nan, 1e-39],
                              ml_dtypes.bfloat16)),
        ('complex64', np.array([1 + 2j, -0.5j, np.inf], np.complex64)),
        ('complex128', np.array([[1e300 - 1e-300j]], np.complex128)),
        ('int64', np.array([-2**63, 2**63 - 1, 0, -1], np.int64)),
        ('int32', np.array([-2**31, 2**31 - 1, 7], np.int32)),
        ('int16', np.array([-2**15, 2**15 - 1], np.int16)),
        ('int8', np.array([-128, 127, 0], np.int8)),
        ('uint8', np.array([0, 255, 17], np.uint8)),
        ('bool', np.array([True, False, True])),
        ('scalar_f32', np.array(2.75, np.float32)),
        ('scalar_i64', np.array(-12345678901, np.int64)),
        ('empty_2d', np.zeros((0, 3), np.float32)),
        ('empty_i64', np.zeros((0,), np.int64)),
        ('block.3d', np.arange(24, dtype=np.float64).reshape(2, 3, 4) * -1.25),
    ])


def _legacy_tail(path):
    """The storage key list and the raw storage section of a legacy file."""
    f = io.BytesIO(path.read_bytes())
    for _ in range(3):  # magic number, protocol version, sys_info
        pickle.load(f)
    ops = list(pickletools.genops(f))  # the object pickle (needs torch to unpickle)
    assert ops[-1][0].name == 'STOP'
    keys = pickle.load(f)
    return keys, f.read()


# --- format ---------------------------------------------------------------------------


@pytest.mark.parametrize('legacy', FORMATS)
def test_round_trip_every_dtype_bit_for_bit(tmp_path, legacy):
    tensors = _every_dtype()
    path = tmp_path / 'weights.pt'
    tc.save_state_dict(path, tensors, legacy=legacy)
    _assert_bitwise_equal(tc.load_state_dict(path), tensors)


def test_zip_records_are_torch_layout(tmp_path):
    """Names, order, contents, no compression and 64-byte alignment, as torch.save writes."""
    path = tmp_path / 'tiny_net.pth'
    tc.save_state_dict(path, {'w': np.ones((2, 3), np.float32), 'n': np.array(4, np.int64)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == [
            'tiny_net/data.pkl', 'tiny_net/.format_version', 'tiny_net/.storage_alignment',
            'tiny_net/byteorder', 'tiny_net/data/0', 'tiny_net/data/1', 'tiny_net/version',
            'tiny_net/.data/serialization_id']
        assert zf.read('tiny_net/version') == b'3\n'
        assert zf.read('tiny_net/byteorder') == b'little'
        assert zf.read('tiny_net/.format_version') == b'1'
        assert zf.read('tiny_net/.storage_alignment') == b'64'
        assert zf.read('tiny_net/data/0') == struct.pack('<6f', *[1.0] * 6)
        assert zf.read('tiny_net/data/1') == struct.pack('<q', 4)
        assert len(zf.read('tiny_net/.data/serialization_id')) == 40
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack_from('<HH', raw, info.header_offset + 26)
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    tc.save_state_dict(tmp_path / 'b.pt', {'w': np.ones(1)}, archive_name='archive')
    assert zipfile.ZipFile(tmp_path / 'b.pt').namelist()[0] == 'archive/data.pkl'


def test_pickle_matches_torch_opcodes(tmp_path):
    """data.pkl as torch 2.x writes it for {'conv.weight': float32 [2, 1, 3, 3], ...}.

    Positions, opcodes and arguments from `pickletools.dis` of a real torch.save'd
    state dict: OrderedDict, _rebuild_tensor_v2(persistent storage id, offset, size,
    stride, requires_grad=False, OrderedDict()), memo puts included.
    """
    path = tmp_path / 'model.pt'
    tc.save_state_dict(path, OrderedDict([
        ('conv.weight', np.zeros((2, 1, 3, 3), np.float32)),
        ('conv.bias', np.zeros(2, np.float32))]))
    data = zipfile.ZipFile(path).read('model/data.pkl')
    ops = [(pos, op.name, arg) for op, arg, pos in pickletools.genops(data)
           if op.name not in ('BINPUT', 'STOP')]
    assert ops[:31] == [
        (0, 'PROTO', 2), (2, 'GLOBAL', 'collections OrderedDict'), (29, 'EMPTY_TUPLE', None),
        (30, 'REDUCE', None), (33, 'MARK', None), (34, 'BINUNICODE', 'conv.weight'),
        (52, 'GLOBAL', 'torch._utils _rebuild_tensor_v2'), (87, 'MARK', None),
        (88, 'MARK', None), (89, 'BINUNICODE', 'storage'),
        (103, 'GLOBAL', 'torch FloatStorage'), (125, 'BINUNICODE', '0'),
        (133, 'BINUNICODE', 'cpu'), (143, 'BININT1', 18), (145, 'TUPLE', None),
        (148, 'BINPERSID', None), (149, 'BININT1', 0), (151, 'MARK', None),
        (152, 'BININT1', 2), (154, 'BININT1', 1), (156, 'BININT1', 3), (158, 'BININT1', 3),
        (160, 'TUPLE', None), (163, 'MARK', None), (164, 'BININT1', 9),
        (166, 'BININT1', 9), (168, 'BININT1', 3), (170, 'BININT1', 1), (172, 'TUPLE', None),
        (175, 'NEWFALSE', None), (176, 'BINGET', 0)]
    assert ops[31:35] == [(178, 'EMPTY_TUPLE', None), (179, 'REDUCE', None),
                          (182, 'TUPLE', None), (185, 'REDUCE', None)]
    assert ops[-1][1] == 'SETITEMS'
    globals_ = {arg for _, name, arg in ops if name == 'GLOBAL'}
    assert globals_ == {'collections OrderedDict', 'torch._utils _rebuild_tensor_v2',
                        'torch FloatStorage'}


@pytest.mark.parametrize('legacy', FORMATS)
def test_state_dict_metadata_is_written_and_skipped(tmp_path, legacy):
    """Module.state_dict() carries `_metadata`, which torch pickles with a final BUILD."""
    state_dict = OrderedDict([('bn.running_mean', np.array([0.5, 1.5], np.float32)),
                              ('bn.num_batches_tracked', np.array(12, np.int64))])
    state_dict._metadata = OrderedDict([('', {'version': 1}), ('bn', {'version': 2})])
    path = tmp_path / 'bn.pt'
    tc.save_state_dict(path, state_dict, legacy=legacy)
    if not legacy:
        ops = [op.name for op, _, _ in pickletools.genops(
            zipfile.ZipFile(path).read('bn/data.pkl'))]
        assert ops[-2:] == ['BUILD', 'STOP']
    _assert_bitwise_equal(tc.load_state_dict(path), state_dict)


def test_legacy_layout(tmp_path):
    """Magic, protocol 1001, sys_info, the pickle, sorted keys, then count + bytes."""
    path = tmp_path / 'old.pth'
    tc.save_state_dict(path, {'a': np.array([1.0, 2.0], np.float64),
                              'b': np.array([7], np.int32)}, legacy=True)
    f = io.BytesIO(path.read_bytes())
    assert pickle.load(f) == 0x1950a86a20f9469cfc6c
    assert pickle.load(f) == 1001
    sys_info = pickle.load(f)
    assert sys_info['protocol_version'] == 1001 and sys_info['little_endian'] is True
    assert sys_info['type_sizes'] == {'short': 2, 'int': 4, 'long': 4}
    ops = list(pickletools.genops(f.read()))
    assert [arg for op, arg, _ in ops if op.name == 'GLOBAL'] == [
        'collections OrderedDict', 'torch._utils _rebuild_tensor_v2', 'torch DoubleStorage',
        'torch IntStorage']  # a repeated global is a memo get
    assert [arg for op, arg, _ in ops if op.name == 'NONE'] == [None, None]  # view metadata
    keys, storage_bytes = _legacy_tail(path)
    assert keys == ['0', '1']
    assert storage_bytes == (struct.pack('<q', 2) + struct.pack('<2d', 1.0, 2.0)
                             + struct.pack('<q', 1) + struct.pack('<i', 7))


# --- views and shared storages --------------------------------------------------------


@pytest.mark.parametrize('legacy', FORMATS)
def test_strided_views_with_offsets(tmp_path, legacy):
    storage = np.arange(20, dtype=np.float32) * 0.5
    tensors = {
        # Transposed: element [i, j] is storage[2 + i + 3 * j].
        'transposed': tc.StorageView(storage, 2, (3, 4), (1, 3)),
        # Expanded (stride 0) row, as torch.expand saves it.
        'expanded': tc.StorageView(storage, 5, (2, 3), (0, 1)),
        'scalar': tc.StorageView(storage, 19, (), ()),
    }
    path = tmp_path / 'views.pt'
    tc.save_state_dict(path, tensors, legacy=legacy)
    got = tc.load_state_dict(path)
    np.testing.assert_array_equal(got['transposed'], storage[2:14].reshape(4, 3).T)
    np.testing.assert_array_equal(got['expanded'], [[2.5, 3.0, 3.5]] * 2)
    assert got['scalar'].shape == () and got['scalar'] == 9.5
    assert all(a.flags.c_contiguous for a in got.values())


@pytest.mark.parametrize('legacy', FORMATS)
def test_two_tensors_share_one_storage(tmp_path, legacy):
    storage = np.array([10, 20, 30, 40, 50, 60], np.int64)
    path = tmp_path / 'shared.pt'
    tc.save_state_dict(path, {'head': tc.StorageView(storage, 0, (2,), (1,)),
                              'tail': tc.StorageView(storage, 2, (2, 2), (2, 1))},
                       legacy=legacy)
    if legacy:
        keys, storage_bytes = _legacy_tail(path)
        assert keys == ['0'] and storage_bytes == struct.pack('<q', 6) + storage.tobytes()
    else:
        assert [n for n in zipfile.ZipFile(path).namelist() if '/data/' in n] == [
            'shared/data/0']
    got = tc.load_state_dict(path)
    np.testing.assert_array_equal(got['head'], [10, 20])
    np.testing.assert_array_equal(got['tail'], [[30, 40], [50, 60]])
    got['head'][0] = -1
    assert got['tail'][0, 0] == 30  # the reader returns independent copies


def test_legacy_storage_view_metadata(tmp_path):
    """torch < 1.0 could pickle a storage viewing part of another storage."""
    root = tc._storage_for(np.arange(10, dtype=np.float32))
    view = tc._LegacyStorageView(root, key='view0', offset=4, numel=5)
    rebuild = tc._torch_global('torch._utils', '_rebuild_tensor_v2')
    obj = OrderedDict(w=tc._Call(rebuild, (view, 1, (2, 2), (1, 2), False, OrderedDict())))
    path = tmp_path / 'view.pt'
    tc.save_torch_object(path, obj, legacy=True)
    # The view holds root[4:9]; the tensor starts 1 into it, column-major 2x2.
    np.testing.assert_array_equal(tc.load_state_dict(path)['w'], [[5.0, 7.0], [6.0, 8.0]])


@pytest.mark.parametrize('legacy', FORMATS)
def test_other_torch_spellings(tmp_path, legacy):
    """torch.Size sizes, Parameters and _rebuild_tensor_v3 (uint16 on untyped bytes)."""
    g = tc._torch_global
    raw = np.array([1, 65535, 258], '<u2')
    untyped = tc._WriterStorage(raw.tobytes(), g('torch', 'UntypedStorage'), raw.nbytes)
    storage = tc._storage_for(np.arange(6, dtype=np.float16))
    obj = OrderedDict([
        ('param', tc._Call(g('torch._utils', '_rebuild_parameter'),
                           (np.array([0.25, -4.0], np.float32), True, OrderedDict()))),
        ('sized', tc._Call(g('torch._utils', '_rebuild_tensor_v2'), (
            storage, 0, tc._Call(g('torch', 'Size'), ((2, 3),)), (3, 1), False,
            OrderedDict()))),
        ('u16', tc._Call(g('torch._utils', '_rebuild_tensor_v3'), (
            untyped, 0, (3,), (1,), False, OrderedDict(), g('torch', 'uint16')))),
    ])
    path = tmp_path / 'spellings.pt'
    tc.save_torch_object(path, obj, legacy=legacy)
    got = tc.load_state_dict(path)
    _assert_bitwise_equal(got, {'param': np.array([0.25, -4.0], np.float32),
                                'sized': np.arange(6, dtype=np.float16).reshape(2, 3),
                                'u16': np.array([1, 65535, 258], np.uint16)})


def test_big_endian_byteorder_record(tmp_path):
    """A zip whose byteorder record says 'big' holds big-endian storages."""
    tensors = {'f': np.array([1.5, -2.0], np.float32), 'i': np.array([1, -2**40], np.int64),
               'h': np.array([0.5], ml_dtypes.bfloat16), 'b': np.array([True, False])}
    path = tmp_path / 'le.pt'
    tc.save_state_dict(path, tensors)
    swapped = tmp_path / 'be.pt'
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, 'w') as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == 'le/byteorder':
                data = b'big'
            elif '/data/' in name:
                itemsize = {'0': 4, '1': 8, '2': 2, '3': 1}[name.rsplit('/', 1)[1]]
                data = np.frombuffer(data, f'u{itemsize}').byteswap().tobytes()
            dst.writestr(name, data)
    _assert_bitwise_equal(tc.load_state_dict(swapped), tensors)


def test_bfloat16_widens_to_float32_without_ml_dtypes(tmp_path, monkeypatch):
    path = tmp_path / 'bf16.pt'
    tc.save_state_dict(path, {'w': np.array([1.0, -2.5, 3.140625, -0.0], ml_dtypes.bfloat16)})
    monkeypatch.setattr(tc, 'ml_dtypes', None)
    got = tc.load_state_dict(path)['w']
    assert got.dtype == np.float32
    assert got.tobytes() == np.array([1.0, -2.5, 3.140625, -0.0], np.float32).tobytes()


# --- selecting and refusing -----------------------------------------------------------


@pytest.mark.parametrize('legacy', FORMATS)
def test_nested_state_dict_needs_key(tmp_path, legacy):
    path = tmp_path / 'ckpt.pt'
    tc.save_torch_object(path, {'model': OrderedDict(w=np.ones(2, np.float32)),
                                'ema': {'w': np.full(2, 3.0, np.float32)}, 'epoch': 7},
                         legacy=legacy)
    with pytest.raises(ValueError, match=r"'model' is of type OrderedDict, not a tensor; "
                                         r"state dicts sit under \['model', 'ema'\]"):
        tc.load_state_dict(path)
    np.testing.assert_array_equal(tc.load_state_dict(path, key='ema')['w'], [3.0, 3.0])
    np.testing.assert_array_equal(tc.load_state_dict(path, key='model')['w'], [1.0, 1.0])
    with pytest.raises(ValueError, match="no top-level key 'optimizer'"):
        tc.load_state_dict(path, key='optimizer')
    with pytest.raises(ValueError, match="no key 'v' under key 'ema.v'"):
        tc.load_state_dict(path, key='ema.v')
    # A dotted key reaches a nested dict, and a list of tensors there (score_sde's EMA).
    tc.save_torch_object(path, {'ema': {'decay': 0.9, 'shadow_params': [np.ones(2), np.zeros(3)]}},
                         legacy=legacy)
    shadow = tc.load_state_dict(path, key='ema.shadow_params')
    assert list(shadow) == ['0', '1'] and shadow['1'].shape == (3,)
    tc.save_torch_object(path, {'w': np.ones(1), 'epoch': 7}, legacy=legacy)
    with pytest.raises(ValueError, match="'epoch' is of type int, not a tensor$"):
        tc.load_state_dict(path)


@pytest.mark.parametrize('legacy', FORMATS)
def test_pickled_list_is_not_a_state_dict(tmp_path, legacy):
    path = tmp_path / 'list.pt'
    tc.save_torch_object(path, [np.ones(2)], legacy=legacy)
    with pytest.raises(ValueError, match='is not a PyTorch state dict: the object is of type '
                                         'list') as info:
        tc.load_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize('legacy', FORMATS)
@pytest.mark.parametrize('module,name', [('os', 'system'), ('builtins', 'eval')])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, legacy, module, name):
    marker = tmp_path / 'pwned'
    command = f'open({str(marker)!r}, "w")' if name == 'eval' else f'touch {marker}'
    path = tmp_path / 'evil.pt'
    tc.save_torch_object(path, OrderedDict(
        w=np.ones(2), x=tc._Call(tc._torch_global(module, name), (command,))), legacy=legacy)
    with pytest.raises(ValueError, match=f'refusing to unpickle the global {module}.{name}'):
        tc.load_state_dict(path)
    assert not marker.exists()


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / 'plain.pkl'
    plain.write_bytes(pickle.dumps({'w': [1.0, 2.0]}))
    with pytest.raises(ValueError, match='is not a PyTorch checkpoint'):
        tc.load_state_dict(plain)
    script = tmp_path / 'script.pt'
    with zipfile.ZipFile(script, 'w') as zf:
        zf.writestr('script/data.pkl', pickle.dumps({}))
        zf.writestr('script/constants.pkl', pickle.dumps(()))
    with pytest.raises(ValueError, match='TorchScript archive'):
        tc.load_state_dict(script)


@pytest.mark.parametrize('legacy', FORMATS)
def test_tensor_past_its_storage_is_refused(tmp_path, legacy):
    storage = tc._storage_for(np.arange(4, dtype=np.float32))
    rebuild = tc._torch_global('torch._utils', '_rebuild_tensor_v2')
    path = tmp_path / 'overrun.pt'
    tc.save_torch_object(path, OrderedDict(
        w=tc._Call(rebuild, (storage, 1, (2, 2), (2, 1), False, OrderedDict()))),
        legacy=legacy)
    with pytest.raises(ValueError, match=r'reaches past its storage of 4 elements'):
        tc.load_state_dict(path)


@pytest.mark.parametrize('legacy', FORMATS)
def test_truncated_file_names_the_file(tmp_path, legacy):
    path = tmp_path / 'cut.pt'
    tc.save_state_dict(path, {'w': np.arange(1000, dtype=np.float32)}, legacy=legacy)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ValueError, match='truncated') as info:
        tc.load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and '\n' not in message


def test_missing_file(tmp_path):
    path = tmp_path / 'absent.pth'
    with pytest.raises(FileNotFoundError) as info:
        tc.load_state_dict(path)
    assert str(info.value).startswith(f'{path} does not exist: a PyTorch checkpoint (a file '
                                      'written by torch.save')
    assert '\n' not in str(info.value)
    with pytest.raises(FileNotFoundError):
        tc.check_hash(path, '00')


def test_writer_refuses_what_torch_would_not_write(tmp_path):
    with pytest.raises(ValueError, match='uint16'):
        tc.save_state_dict(tmp_path / 'a.pt', {'w': np.zeros(2, np.uint16)})
    with pytest.raises(ValueError, match='does not fit'):
        tc.save_state_dict(tmp_path / 'a.pt',
                           {'w': tc.StorageView(np.zeros(4), 1, (2,), (3,))})


# --- hashes ---------------------------------------------------------------------------


def test_hash_prefix_from_name():
    assert tc.hash_prefix_from_name('pt_inception-2015-12-05-6726825d.pth') == '6726825d'
    assert tc.hash_prefix_from_name('/w/resnet18-f37072fd.pth') == 'f37072fd'
    assert tc.hash_prefix_from_name('model.pth') is None
    assert tc.hash_prefix_from_name('model-abc.pth') is None  # under 8 digits
    assert tc.hash_prefix_from_name('model-F37072FD.pth') is None  # torch.hub is lower case


def test_check_hash_accepts_right_prefix_and_refuses_wrong(tmp_path):
    path = tmp_path / 'weights.pth'
    tc.save_state_dict(path, {'w': np.arange(3, dtype=np.float32)})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    named = tmp_path / f'weights-{digest[:8]}.pth'
    os.rename(path, named)
    assert tc.file_sha256(named) == digest
    assert tc.check_hash(named, tc.hash_prefix_from_name(named)) == digest
    assert tc.check_hash(named, digest.upper()) == digest
    wrong = ('0' if digest[0] != '0' else '1') + digest[1:8]
    with pytest.raises(ValueError) as info:
        tc.check_hash(named, wrong)
    message = str(info.value)
    assert '\n' not in message
    assert str(named) in message and wrong in message and digest in message
    with pytest.raises(ValueError, match='hex digits'):
        tc.check_hash(named, '')
